//! A RAM disk in one screen, on the owned-buffer API: `cargo run --example hello_ram` (as root,
//! with `ublk_drv` loaded), then use /dev/ublkbN; Ctrl-C removes it.

use std::sync::Mutex;

use ublk_core::{BlockDevice, DeviceBuilder, Owned, ReadReply, Reply};

const SIZE: u64 = 64 << 20;

struct RamDisk(Mutex<Vec<u8>>);

impl RamDisk {
    fn range(offset: u64, len: u32) -> std::ops::Range<usize> {
        // The engine has checked offset + len against the device size.
        offset as usize..offset as usize + len as usize
    }
}

impl BlockDevice for RamDisk {
    fn read(&self, offset: u64, len: u32, reply: ReadReply) {
        let data = self.0.lock().expect("no panics while locked");
        reply.data(&data[Self::range(offset, len)]);
    }

    fn write(&self, offset: u64, bytes: &[u8], _fua: bool, reply: Reply) {
        let mut data = self.0.lock().expect("no panics while locked");
        data[Self::range(offset, bytes.len() as u32)].copy_from_slice(bytes);
        reply.ok();
    }

    fn flush(&self, reply: Reply) {
        reply.ok(); // memory is as durable as it gets
    }

    fn discard(&self, offset: u64, len: u32, reply: Reply) {
        self.0.lock().expect("no panics while locked")[Self::range(offset, len)].fill(0);
        reply.ok();
    }
}

fn main() -> Result<(), ublk_core::Error> {
    let disk = RamDisk(Mutex::new(vec![0; SIZE as usize]));
    DeviceBuilder::new()
        .size(SIZE)
        .queues(2)
        .discard(true)
        .run_with(Owned::new(disk), |dev| {
            println!(
                "serving {} ({} MiB); Ctrl-C to stop",
                dev.block_path,
                SIZE >> 20
            )
        })
}
