//! The mirror's on-disk metadata: superblock and write-intent bitmap (being written).
