//! The stack expression language: a tree of targets written on one line, such as
//! `stripe(file:/a, file:/b, chunk=64K)`.
//!
//! ```text
//! EXPR := LEAF | NAME '(' ARG (',' ARG)* ')'
//! LEAF := 'file:' PATH | 'ram:' SIZE | 'null:' SIZE | 'rbd:' POOL '/' IMAGE ['@' SNAP]
//! ARG  := EXPR | KEY '=' VALUE
//! ```
//!
//! Whitespace around tokens is ignored. NAME and KEY are `[a-z_][a-z0-9_-]*`. A PATH runs to
//! the next `,` or `)` and holds no `,()` (spaces inside it are kept, those at its ends are
//! not); a SIZE is a bare token without `,()=:` or whitespace (`64M`); a VALUE is a bare token
//! without `,()=` or whitespace (`64K`, `true`, `1M:64K`). A node's parameters may come
//! before, after or between its children; the children keep their order.
//!
//! [`parse`] only checks the syntax (and that no key is given twice); which names and keys
//! mean something is up to the code that builds targets from the tree, with the helpers on
//! [`Node`] and [`Param`]. Every error carries the byte offset it is about.
//!
//! ```
//! use ublk_targets::expr::{parse, Expr};
//!
//! let tree = parse("stripe( file:/a , file:/b, chunk=128K )")?;
//! assert_eq!(tree.to_string(), "stripe(file:/a,file:/b,chunk=128K)");
//! let Expr::Node(stripe) = &tree else { unreachable!() };
//! stripe.check_keys(&["chunk"])?;
//! assert_eq!(stripe.param("chunk").map(|p| p.size()).transpose()?, Some(128 << 10));
//! # Ok::<(), ublk_targets::expr::ExprError>(())
//! ```

use std::fmt;

/// How deeply nodes may nest; deeper input is refused rather than risking the stack.
pub const MAX_DEPTH: usize = 64;

/// A syntax or value error, at a byte offset into the expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {}: {msg}", .pos.saturating_add(1))]
pub struct ExprError {
    /// 0-based byte offset into the expression text.
    pub pos: usize,
    /// What is wrong, without the position.
    pub msg: String,
}

impl ExprError {
    /// An error at byte offset `pos`.
    pub fn new(pos: usize, msg: impl Into<String>) -> Self {
        ExprError {
            pos,
            msg: msg.into(),
        }
    }
}

/// A parsed expression: a leaf or a node with arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `file:PATH`, `ram:SIZE` or `null:SIZE`.
    Leaf(Leaf),
    /// `NAME(ARG, ...)`.
    Node(Node),
}

/// The kinds of leaf, each written `KIND:ARG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeafKind {
    /// `file:PATH`, a file or block device.
    File,
    /// `ram:SIZE`, memory.
    Ram,
    /// `null:SIZE`, stores nothing.
    Null,
    /// `rbd:POOL/IMAGE` or `rbd:POOL/IMAGE@SNAP`, a Ceph RBD image (a bare token).
    Rbd,
}

/// A leaf, such as `file:/dev/sdb` or `ram:64M`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Which kind.
    pub kind: LeafKind,
    /// The text after the colon, without surrounding whitespace.
    pub arg: String,
    /// Where the leaf starts.
    pub pos: usize,
    /// Where `arg` starts.
    pub arg_pos: usize,
}

/// A node, such as `stripe(file:/a, file:/b, chunk=64K)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The name before the parenthesis.
    pub name: String,
    /// The arguments that are expressions, in order.
    pub children: Vec<Expr>,
    /// The `KEY=VALUE` arguments, in order; no key appears twice.
    pub params: Vec<Param>,
    /// Where the name starts.
    pub pos: usize,
}

/// A `KEY=VALUE` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The key.
    pub key: String,
    /// The value, as written.
    pub value: String,
    /// Where the key starts.
    pub pos: usize,
    /// Where the value starts.
    pub value_pos: usize,
}

/// Parses a stack expression.
pub fn parse(text: &str) -> Result<Expr, ExprError> {
    let mut p = Parser { text, pos: 0 };
    p.skip_ws();
    if p.peek().is_none() {
        return Err(ExprError::new(p.pos, "empty expression"));
    }
    let expr = match p.arg(0)? {
        Arg::Expr(expr) => expr,
        Arg::Param(param) => {
            return Err(ExprError::new(
                param.pos,
                format!(
                    "parameter '{}' outside of a node: write it as NAME(..., {}={})",
                    param.key, param.key, param.value
                ),
            ))
        }
    };
    p.skip_ws();
    match p.peek() {
        None => Ok(expr),
        Some(')') => Err(ExprError::new(p.pos, "unmatched ')'")),
        Some(_) => Err(ExprError::new(
            p.pos,
            "unexpected text after the expression",
        )),
    }
}

impl Expr {
    /// Where the expression starts in the text it was parsed from.
    pub fn pos(&self) -> usize {
        match self {
            Expr::Leaf(leaf) => leaf.pos,
            Expr::Node(node) => node.pos,
        }
    }

    /// A short name for messages: `file:/a` for a leaf, `stripe(...)` for a node.
    pub fn describe(&self) -> String {
        match self {
            Expr::Leaf(leaf) => leaf.to_string(),
            Expr::Node(node) => format!("{}(...)", node.name),
        }
    }

    /// Whether both trees are the same apart from positions.
    pub fn same_shape(&self, other: &Expr) -> bool {
        match (self, other) {
            (Expr::Leaf(a), Expr::Leaf(b)) => a.kind == b.kind && a.arg == b.arg,
            (Expr::Node(a), Expr::Node(b)) => {
                a.name == b.name
                    && a.children.len() == b.children.len()
                    && a.children
                        .iter()
                        .zip(&b.children)
                        .all(|(x, y)| x.same_shape(y))
                    && a.params.len() == b.params.len()
                    && a.params
                        .iter()
                        .zip(&b.params)
                        .all(|(x, y)| x.key == y.key && x.value == y.value)
            }
            _ => false,
        }
    }
}

/// The canonical form: no spaces, a node's children first, then its parameters, each group
/// in the order given. Parsing it gives back the same tree (see [`Expr::same_shape`]).
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Leaf(leaf) => leaf.fmt(f),
            Expr::Node(node) => node.fmt(f),
        }
    }
}

impl LeafKind {
    /// Every kind.
    pub const ALL: [LeafKind; 4] = [LeafKind::File, LeafKind::Ram, LeafKind::Null, LeafKind::Rbd];

    /// The name before the colon.
    pub fn name(self) -> &'static str {
        match self {
            LeafKind::File => "file",
            LeafKind::Ram => "ram",
            LeafKind::Null => "null",
            LeafKind::Rbd => "rbd",
        }
    }

    /// The kind a name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl Leaf {
    /// The argument read as a size (`ram:64M`), with the error at the argument.
    pub fn size(&self) -> Result<u64, ExprError> {
        parse_size_at(&self.arg, self.arg_pos, self.kind.name())
    }
}

/// `file:/a`.
impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.arg)
    }
}

impl Node {
    /// The parameter with this key, if given.
    pub fn param(&self, key: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.key == key)
    }

    /// Fails on the first parameter whose key is not in `allowed`.
    pub fn check_keys(&self, allowed: &[&str]) -> Result<(), ExprError> {
        match self
            .params
            .iter()
            .find(|p| !allowed.contains(&p.key.as_str()))
        {
            None => Ok(()),
            Some(p) if allowed.is_empty() => Err(ExprError::new(
                p.pos,
                format!(
                    "unknown parameter '{}': {} takes no parameters",
                    p.key, self.name
                ),
            )),
            Some(p) => Err(ExprError::new(
                p.pos,
                format!(
                    "unknown parameter '{}' for {} ({})",
                    p.key,
                    self.name,
                    allowed.join(", ")
                ),
            )),
        }
    }
}

/// `stripe(file:/a,chunk=64K)`.
impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        let args = self
            .children
            .iter()
            .map(|c| c as &dyn fmt::Display)
            .chain(self.params.iter().map(|p| p as &dyn fmt::Display));
        for (i, arg) in args.enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            arg.fmt(f)?;
        }
        f.write_str(")")
    }
}

impl Param {
    /// The value as a size: a number with an optional K, M, G or T suffix.
    pub fn size(&self) -> Result<u64, ExprError> {
        parse_size_at(&self.value, self.value_pos, &self.key)
    }

    /// The value as a flag: `true`/`false`, `yes`/`no` or `1`/`0`.
    pub fn bool(&self) -> Result<bool, ExprError> {
        match self.value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok(true),
            "false" | "no" | "0" => Ok(false),
            _ => Err(self.value_error(format!(
                "expected true or false (or yes/no, 1/0), found '{}'",
                self.value
            ))),
        }
    }

    /// The value as a whole number.
    pub fn u64(&self) -> Result<u64, ExprError> {
        self.value.parse().map_err(|_| {
            self.value_error(format!("expected a whole number, found '{}'", self.value))
        })
    }

    /// The value as `OFFSET:LEN`, both sizes (`1M:64K`); `OFFSET + LEN` must fit in a u64.
    pub fn range(&self) -> Result<(u64, u64), ExprError> {
        let Some((offset, len)) = self.value.split_once(':') else {
            return Err(self.value_error(format!(
                "expected OFFSET:LEN such as 1M:64K, found '{}'",
                self.value
            )));
        };
        let offset = parse_size_at(offset, self.value_pos, &self.key)?;
        let len_pos = self.value_pos + self.value.len() - len.len();
        let len = parse_size_at(len, len_pos, &self.key)?;
        if offset.checked_add(len).is_none() {
            return Err(self.value_error("offset + length is too large"));
        }
        Ok((offset, len))
    }

    fn value_error(&self, msg: impl fmt::Display) -> ExprError {
        ExprError::new(self.value_pos, format!("{}: {msg}", self.key))
    }
}

/// `chunk=64K`.
impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// [`ublk_core::parse_size`], its error placed at `pos` and prefixed with `what`.
fn parse_size_at(text: &str, pos: usize, what: &str) -> Result<u64, ExprError> {
    ublk_core::parse_size(text).map_err(|e| {
        let msg = match e {
            ublk_core::Error::InvalidParam(msg) => msg,
            other => other.to_string(),
        };
        ExprError::new(pos, format!("{what}: {msg}"))
    })
}

/// One argument of a node.
enum Arg {
    Expr(Expr),
    Param(Param),
}

/// A recursive-descent parser; `pos` is always on a character boundary of `text`.
struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

/// Characters that end a word: the grammar's punctuation (whitespace ends one too).
const PUNCTUATION: [char; 5] = [',', '(', ')', '=', ':'];

impl Parser<'_> {
    fn rest(&self) -> &str {
        self.text.get(self.pos..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    /// Advances past the longest prefix whose characters satisfy `keep`; returns it.
    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> &str {
        let start = self.pos;
        let rest = self.rest();
        let len = rest.find(|c| !keep(c)).unwrap_or(rest.len());
        self.pos += len;
        self.text.get(start..self.pos).unwrap_or("")
    }

    /// One argument (or the whole expression at depth 0), starting at a non-space character.
    fn arg(&mut self, depth: usize) -> Result<Arg, ExprError> {
        let start = self.pos;
        let word = self
            .take_while(|c| !c.is_whitespace() && !PUNCTUATION.contains(&c))
            .to_owned();
        if word.is_empty() {
            return Err(ExprError::new(
                start,
                match self.peek() {
                    Some(':') => "expected a leaf kind before ':' (file:, ram:, null:, rbd:)",
                    Some('=') => "expected a parameter name before '='",
                    Some(')') if depth == 0 => "unmatched ')'",
                    _ => "expected a node name",
                },
            ));
        }
        self.skip_ws();
        match self.peek() {
            Some(':') => {
                self.pos += 1;
                self.leaf(start, &word).map(Arg::Expr)
            }
            Some('(') => {
                check_name(start, &word, "node name")?;
                self.pos += 1;
                self.node(start, word, depth).map(Arg::Expr)
            }
            Some('=') => {
                check_name(start, &word, "parameter name")?;
                self.pos += 1;
                self.param(start, word).map(Arg::Param)
            }
            _ if depth > 0 => Err(ExprError::new(
                self.pos,
                format!("expected '(', ':' or '=' after '{word}'"),
            )),
            _ => Err(ExprError::new(
                self.pos,
                format!("expected '(' or ':' after '{word}'"),
            )),
        }
    }

    /// The rest of a leaf, after `KIND:`.
    fn leaf(&mut self, start: usize, kind: &str) -> Result<Expr, ExprError> {
        let Some(kind) = LeafKind::from_name(kind) else {
            return Err(ExprError::new(
                start,
                format!("unknown leaf kind '{kind}:' (file:, ram:, null:, rbd:)"),
            ));
        };
        self.skip_ws();
        let arg_pos = self.pos;
        // A path may hold spaces (not at its ends); a size is one bare token.
        let (arg, what) = match kind {
            LeafKind::File => (
                self.take_while(|c| !matches!(c, ',' | '(' | ')'))
                    .trim_end(),
                "path",
            ),
            LeafKind::Ram | LeafKind::Null => (
                self.take_while(|c| !c.is_whitespace() && !PUNCTUATION.contains(&c)),
                "size",
            ),
            LeafKind::Rbd => (
                self.take_while(|c| !c.is_whitespace() && !PUNCTUATION.contains(&c)),
                "image",
            ),
        };
        let arg = arg.to_owned();
        if self.peek() == Some('(') {
            return Err(ExprError::new(
                self.pos,
                format!("'(' cannot appear in a {what}"),
            ));
        }
        if arg.is_empty() {
            return Err(ExprError::new(
                arg_pos,
                format!("missing {what} after '{}:'", kind.name()),
            ));
        }
        Ok(Expr::Leaf(Leaf {
            kind,
            arg,
            pos: start,
            arg_pos,
        }))
    }

    /// The rest of a node, after `NAME(`.
    fn node(&mut self, start: usize, name: String, depth: usize) -> Result<Expr, ExprError> {
        if depth >= MAX_DEPTH {
            return Err(ExprError::new(
                start,
                format!("expression nested too deeply (more than {MAX_DEPTH} levels)"),
            ));
        }
        let open = self.pos - 1;
        let unclosed = |pos| {
            ExprError::new(
                pos,
                format!("missing ')' for the '(' at column {}", open + 1),
            )
        };
        let mut node = Node {
            name,
            children: Vec::new(),
            params: Vec::new(),
            pos: start,
        };
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Err(unclosed(self.pos)),
                Some(')') if node.children.is_empty() && node.params.is_empty() => {
                    return Err(ExprError::new(
                        self.pos,
                        format!("empty argument list for {}", node.name),
                    ))
                }
                Some(',' | ')') => return Err(ExprError::new(self.pos, "empty argument")),
                Some(_) => match self.arg(depth + 1)? {
                    Arg::Expr(child) => node.children.push(child),
                    Arg::Param(param) => {
                        if let Some(first) = node.param(&param.key) {
                            return Err(ExprError::new(
                                param.pos,
                                format!(
                                    "parameter '{}' given twice (first at column {})",
                                    param.key,
                                    first.pos + 1
                                ),
                            ));
                        }
                        node.params.push(param);
                    }
                },
            }
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    return Ok(Expr::Node(node));
                }
                None => return Err(unclosed(self.pos)),
                Some(_) => return Err(ExprError::new(self.pos, "expected ')' or ','")),
            }
        }
    }

    /// The rest of a parameter, after `KEY=`.
    fn param(&mut self, start: usize, key: String) -> Result<Param, ExprError> {
        self.skip_ws();
        let value_pos = self.pos;
        let value = self
            .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | '(' | ')' | '='))
            .to_owned();
        if value.is_empty() {
            return Err(ExprError::new(
                value_pos,
                format!("missing value for '{key}'"),
            ));
        }
        Ok(Param {
            key,
            value,
            pos: start,
            value_pos,
        })
    }
}

/// Checks that `word` is `[a-z_][a-z0-9_-]*`.
fn check_name(pos: usize, word: &str, what: &str) -> Result<(), ExprError> {
    let mut bytes = word.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if first_ok
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        Ok(())
    } else {
        Err(ExprError::new(
            pos,
            format!(
                "invalid {what} '{word}': use lowercase letters, digits, '_' and '-', \
                 starting with a letter or '_'"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(expr: &Expr) -> &Node {
        match expr {
            Expr::Node(node) => node,
            Expr::Leaf(leaf) => panic!("expected a node, got {leaf}"),
        }
    }

    fn leaf(expr: &Expr) -> &Leaf {
        match expr {
            Expr::Leaf(leaf) => leaf,
            Expr::Node(node) => panic!("expected a leaf, got {node}"),
        }
    }

    /// The error for `text`, as (column, message).
    fn error(text: &str) -> (usize, String) {
        let e = parse(text).expect_err(text);
        (e.pos + 1, e.msg)
    }

    #[test]
    fn rbd_leaves_name_a_pool_an_image_and_maybe_a_snapshot() {
        let text = "mirror( rbd:rbd/disk@snap1 , file:/b)";
        let tree = parse(text).unwrap();
        assert_eq!(tree.to_string(), "mirror(rbd:rbd/disk@snap1,file:/b)");
        let leaf = match &node(&tree).children[0] {
            Expr::Leaf(leaf) => leaf.clone(),
            other => panic!("expected a leaf, got {other}"),
        };
        assert_eq!(
            (leaf.kind, leaf.arg.as_str()),
            (LeafKind::Rbd, "rbd/disk@snap1")
        );
        assert_eq!(parse("rbd:").unwrap_err().msg, "missing image after 'rbd:'");
    }

    #[test]
    fn stripe_of_two_files() {
        let text = "stripe(file:/a,file:/b,chunk=128K)";
        let tree = parse(text).unwrap();
        let stripe = node(&tree);
        assert_eq!(stripe.name, "stripe");
        assert_eq!(stripe.pos, 0);
        assert_eq!(stripe.children.len(), 2);
        let a = leaf(&stripe.children[0]);
        assert_eq!(
            (a.kind, a.arg.as_str(), a.pos, a.arg_pos),
            (LeafKind::File, "/a", 7, 12)
        );
        let b = leaf(&stripe.children[1]);
        assert_eq!((b.kind, b.arg.as_str(), b.pos), (LeafKind::File, "/b", 15));
        let chunk = stripe.param("chunk").unwrap();
        assert_eq!((chunk.pos, chunk.value_pos), (23, 29));
        assert_eq!(chunk.size(), Ok(128 << 10));
        assert_eq!(stripe.param("fail"), None);
        assert_eq!(tree.to_string(), text);
        assert_eq!(tree.describe(), "stripe(...)");
        assert_eq!(stripe.children[1].describe(), "file:/b");
        assert_eq!(stripe.children[1].pos(), 15);
    }

    #[test]
    fn nested_stripes() {
        let text = "stripe(stripe(file:/a,file:/b),stripe(ram:64M,ram:64M))";
        let tree = parse(text).unwrap();
        let top = node(&tree);
        assert_eq!(top.children.len(), 2);
        assert!(top.params.is_empty());
        let right = node(&top.children[1]);
        assert_eq!(right.pos, 31);
        let ram = leaf(&right.children[1]);
        assert_eq!(
            (ram.kind, ram.arg.as_str(), ram.pos),
            (LeafKind::Ram, "64M", 46)
        );
        assert_eq!(ram.size(), Ok(64 << 20));
        assert_eq!(tree.to_string(), text);
    }

    #[test]
    fn faulty_with_and_without_parameters() {
        let tree = parse("faulty(file:/a)").unwrap();
        assert_eq!(node(&tree).children.len(), 1);
        assert_eq!(tree.to_string(), "faulty(file:/a)");

        let text = "faulty( file:/a , fail=read, range=1M:64K )";
        let tree = parse(text).unwrap();
        let faulty = node(&tree);
        assert_eq!(leaf(&faulty.children[0]).pos, 8);
        assert_eq!(leaf(&faulty.children[0]).arg, "/a");
        assert_eq!(faulty.param("fail").unwrap().value, "read");
        let range = faulty.param("range").unwrap();
        assert_eq!((range.pos, range.value_pos), (29, 35));
        assert_eq!(range.range(), Ok((1 << 20, 64 << 10)));
        assert_eq!(tree.to_string(), "faulty(file:/a,fail=read,range=1M:64K)");
        assert!(faulty
            .check_keys(&["fail", "range", "every", "delay"])
            .is_ok());
    }

    #[test]
    fn long_form_with_parameters_only() {
        let tree = parse("file(path=/x,direct=true)").unwrap();
        let file = node(&tree);
        assert!(file.children.is_empty());
        assert_eq!(file.param("path").unwrap().value, "/x");
        assert_eq!(file.param("direct").unwrap().bool(), Ok(true));
        assert_eq!(tree.to_string(), "file(path=/x,direct=true)");
    }

    #[test]
    fn parameters_may_come_first_and_children_keep_their_order() {
        let tree = parse("stripe(chunk=64K, null:1G, ram:1G, file:/c)").unwrap();
        assert_eq!(tree.to_string(), "stripe(null:1G,ram:1G,file:/c,chunk=64K)");
        let again = parse(&tree.to_string()).unwrap();
        assert!(again.same_shape(&tree));
        assert_ne!(again, tree, "positions differ");
    }

    #[test]
    fn paths_run_to_the_next_comma_or_parenthesis() {
        let tree = parse("  stripe ( file: /my dir/a=b:c , file:/dev/sdb)\t").unwrap();
        let stripe = node(&tree);
        assert_eq!(stripe.pos, 2);
        let a = leaf(&stripe.children[0]);
        assert_eq!(
            (a.arg.as_str(), a.pos, a.arg_pos),
            ("/my dir/a=b:c", 11, 17)
        );
        assert_eq!(tree.to_string(), "stripe(file:/my dir/a=b:c,file:/dev/sdb)");
        let unicode = parse("file:/tmp/é").unwrap();
        assert_eq!(leaf(&unicode).arg, "/tmp/é");
    }

    #[test]
    fn syntax_errors_name_their_column() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "empty expression"),
            ("   ", 4, "empty expression"),
            ("stripe(ram:1M ram:1M)", 15, "expected ')' or ','"),
            ("stripe(faulty(file:/a) file:/b)", 24, "expected ')' or ','"),
            ("ram:1M:2M", 7, "unexpected text after the expression"),
            ("stripe(file:/a,,file:/b)", 16, "empty argument"),
            ("stripe(file:/a,)", 16, "empty argument"),
            ("stripe(,file:/a)", 8, "empty argument"),
            ("stripe()", 8, "empty argument list for stripe"),
            ("stripe(file:/a) x", 17, "unexpected text after the expression"),
            ("stripe(file:/a))", 16, "unmatched ')'"),
            (")", 1, "unmatched ')'"),
            ("stripe(file:/a", 15, "missing ')' for the '(' at column 7"),
            ("stripe(faulty(file:/a)", 23, "missing ')' for the '(' at column 7"),
            ("stripe(foo:/a,file:/b)", 8, "unknown leaf kind 'foo:' (file:, ram:, null:, rbd:)"),
            ("(file:/a)", 1, "expected a node name"),
            ("stripe((file:/a))", 8, "expected a node name"),
            ("stripe(:/a)", 8, "expected a leaf kind before ':' (file:, ram:, null:, rbd:)"),
            ("stripe(file:/a,=1)", 16, "expected a parameter name before '='"),
            ("stripe", 7, "expected '(' or ':' after 'stripe'"),
            ("stripe(file:/a, x)", 18, "expected '(', ':' or '=' after 'x'"),
            ("stripe(file:/a,chunk=64K,chunk=4K)", 26, "parameter 'chunk' given twice (first at column 16)"),
            ("stripe(file:/a,chunk=)", 22, "missing value for 'chunk'"),
            ("stripe(file:/a,chunk=64K=1)", 25, "expected ')' or ','"),
            ("stripe(file:/a,chunk=64 K)", 25, "expected ')' or ','"),
            ("stripe(file:)", 13, "missing path after 'file:'"),
            ("ram:", 5, "missing size after 'ram:'"),
            ("file:/a(b)", 8, "'(' cannot appear in a path"),
            ("chunk=64K", 1, "parameter 'chunk' outside of a node: write it as NAME(..., chunk=64K)"),
            ("Stripe(file:/a)", 1, "invalid node name 'Stripe': use lowercase letters, digits, '_' and '-', starting with a letter or '_'"),
            ("s(file:/a,2x=1)", 11, "invalid parameter name '2x': use lowercase letters, digits, '_' and '-', starting with a letter or '_'"),
        ];
        for &(text, column, msg) in cases {
            assert_eq!(error(text), (column, msg.to_owned()), "parsing {text:?}");
        }
        assert_eq!(
            parse("stripe(ram:1M ram:1M)").unwrap_err().to_string(),
            "at column 15: expected ')' or ','"
        );
    }

    #[test]
    fn nesting_is_limited() {
        let ok = format!("{}file:/a{}", "s(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let deep = "s(".repeat(100_000);
        let (column, msg) = error(&deep);
        assert_eq!(column, 2 * MAX_DEPTH + 1);
        assert_eq!(msg, "expression nested too deeply (more than 64 levels)");
    }

    #[test]
    fn check_keys_names_the_allowed_keys() {
        let tree = parse("stripe(file:/a, file:/b, foo=1)").unwrap();
        let e = node(&tree).check_keys(&["chunk"]).unwrap_err();
        assert_eq!(
            (e.pos, e.msg.as_str()),
            (25, "unknown parameter 'foo' for stripe (chunk)")
        );
        let e = node(&tree).check_keys(&["chunk", "other"]).unwrap_err();
        assert_eq!(e.msg, "unknown parameter 'foo' for stripe (chunk, other)");
        let e = node(&tree).check_keys(&[]).unwrap_err();
        assert_eq!(e.msg, "unknown parameter 'foo': stripe takes no parameters");
        assert!(node(&tree).check_keys(&["foo"]).is_ok());
    }

    #[test]
    fn parameter_values_convert_with_errors_at_the_value() {
        let tree = parse(
            "n(file:/a, chunk = 64Q, direct=maybe, every=x7, range=1M, r2=1M:lots, r3=16777215T:1T, b=NO, e=12)",
        )
        .unwrap();
        let n = node(&tree);
        let p = |key| n.param(key).unwrap();

        let e = p("chunk").size().unwrap_err();
        assert_eq!(e.pos, 19);
        assert_eq!(
            e.msg,
            "chunk: bad size \"64Q\": use a number with an optional K, M, G or T suffix"
        );
        let e = p("direct").bool().unwrap_err();
        assert_eq!(e.pos, 31);
        assert_eq!(
            e.msg,
            "direct: expected true or false (or yes/no, 1/0), found 'maybe'"
        );
        assert_eq!(p("b").bool(), Ok(false));
        let e = p("every").u64().unwrap_err();
        assert_eq!(
            (e.pos, e.msg.as_str()),
            (44, "every: expected a whole number, found 'x7'")
        );
        assert_eq!(p("e").u64(), Ok(12));
        let e = p("range").range().unwrap_err();
        assert_eq!(
            (e.pos, e.msg.as_str()),
            (54, "range: expected OFFSET:LEN such as 1M:64K, found '1M'")
        );
        let e = p("r2").range().unwrap_err();
        assert_eq!(e.pos, 64, "points at the length");
        assert!(e.msg.starts_with("r2: bad size \"lots\""), "{}", e.msg);
        let e = p("r3").range().unwrap_err();
        assert_eq!(
            (e.pos, e.msg.as_str()),
            (73, "r3: offset + length is too large")
        );
        assert_eq!(
            parse("f(r=16777215T:1023G)").map(|t| node(&t).params[0].range()),
            Ok(Ok((16_777_215 << 40, 1023 << 30)))
        );
        let leaf = parse("null:12X").unwrap();
        let Expr::Leaf(leaf) = leaf else { panic!() };
        let e = leaf.size().unwrap_err();
        assert_eq!(e.pos, 5);
        assert_eq!(
            e.msg,
            "null: bad size \"12X\": use a number with an optional K, M, G or T suffix"
        );
    }

    const NAMES: [&str; 5] = ["stripe", "faulty", "file", "mirror_2", "ram"];
    const KEYS: [&str; 7] = [
        "chunk", "fail", "range", "direct", "size", "every", "de-lay",
    ];
    const VALUES: [&str; 8] = [
        "64K", "true", "1M:64K", "/dev/sdb", "read", "0", "128", "a:b:c",
    ];
    const SIZES: [&str; 4] = ["64K", "64M", "1G", "4096"];

    fn leaf_strategy() -> impl Strategy<Value = Expr> {
        let path = "/[a-zA-Z0-9_./:= é-]{0,10}[a-zA-Z0-9_.é]";
        prop_oneof![
            path.prop_map(|p| (LeafKind::File, p)),
            (
                prop::sample::select(&[LeafKind::Ram, LeafKind::Null][..]),
                prop::sample::select(&SIZES[..]).prop_map(str::to_owned)
            ),
        ]
        .prop_map(|(kind, arg)| {
            Expr::Leaf(Leaf {
                kind,
                arg,
                pos: 0,
                arg_pos: 0,
            })
        })
    }

    fn params_strategy() -> impl Strategy<Value = Vec<Param>> {
        prop::sample::subsequence(&KEYS[..], 0..=3)
            .prop_shuffle()
            .prop_flat_map(|keys| {
                let n = keys.len();
                (
                    Just(keys),
                    prop::collection::vec(prop::sample::select(&VALUES[..]), n),
                )
            })
            .prop_map(|(keys, values)| {
                keys.into_iter()
                    .zip(values)
                    .map(|(key, value)| Param {
                        key: key.to_owned(),
                        value: value.to_owned(),
                        pos: 0,
                        value_pos: 0,
                    })
                    .collect()
            })
    }

    fn expr_strategy() -> impl Strategy<Value = Expr> {
        leaf_strategy().prop_recursive(4, 24, 4, |inner| {
            (
                prop::sample::select(&NAMES[..]),
                prop::collection::vec(inner, 0..4),
                params_strategy(),
            )
                .prop_filter("a node needs an argument", |(_, c, p)| {
                    !c.is_empty() || !p.is_empty()
                })
                .prop_map(|(name, children, params)| {
                    Expr::Node(Node {
                        name: name.to_owned(),
                        children,
                        params,
                        pos: 0,
                    })
                })
        })
    }

    /// Every position in the tree, for bounds checks.
    fn positions(expr: &Expr, out: &mut Vec<usize>) {
        match expr {
            Expr::Leaf(leaf) => out.extend([leaf.pos, leaf.arg_pos]),
            Expr::Node(node) => {
                out.push(node.pos);
                out.extend(node.params.iter().flat_map(|p| [p.pos, p.value_pos]));
                for child in &node.children {
                    positions(child, out);
                }
            }
        }
    }

    fn check_any_input(text: &str) -> Result<(), TestCaseError> {
        match parse(text) {
            Ok(tree) => {
                let mut all = Vec::new();
                positions(&tree, &mut all);
                prop_assert!(
                    all.iter().all(|&p| p <= text.len()),
                    "{:?} in {:?}",
                    all,
                    text
                );
                let canonical = tree.to_string();
                let again = parse(&canonical);
                prop_assert!(
                    again.as_ref().is_ok_and(|t| t.same_shape(&tree)),
                    "{:?} -> {:?} -> {:?}",
                    text,
                    canonical,
                    again
                );
            }
            Err(e) => prop_assert!(e.pos <= text.len(), "{:?} for {:?}", e, text),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(text in any::<String>()) {
            check_any_input(&text)?;
        }

        #[test]
        fn near_miss_strings_never_panic(text in "[a-z_:(),= /0-9KMé\t\u{a0}-]{0,40}") {
            check_any_input(&text)?;
        }

        #[test]
        fn canonical_form_round_trips(tree in expr_strategy()) {
            let text = tree.to_string();
            let parsed = parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            prop_assert!(parsed.same_shape(&tree), "{} parsed as {:?}", text, parsed);
            prop_assert_eq!(parsed.to_string(), text);
        }

        #[test]
        fn whitespace_around_tokens_is_ignored(tree in expr_strategy()) {
            let text = tree.to_string();
            let spaced = format!(
                " \t{} \n",
                text.replace(',', " , ").replace('(', " ( ").replace(')', " ) ")
            );
            let parsed =
                parse(&spaced).map_err(|e| TestCaseError::fail(format!("{spaced:?}: {e}")))?;
            prop_assert_eq!(parsed.to_string(), text);
        }
    }
}
