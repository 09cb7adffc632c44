//! The YAML document as a tree of nodes that know their position, built with serde-saphyr.
//!
//! The schema is checked on this tree (in `schema.rs`) rather than by deriving
//! `Deserialize` for the config structs, so that one pass finds every unknown key,
//! duplicate key and bad value instead of stopping at the first, and can say where each is.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{
    Budget, DuplicateKeyPolicy, Location, MessageFormatter as _, Options, Spanned,
    UserMessageFormatter, options::NonFiniteFloatPolicy,
};

use super::error::{Pos, Problem};

/// Deepest nesting accepted; the schema itself needs 6 levels.
const MAX_DEPTH: usize = 16;

/// A YAML node and where it starts (for a mapping: its first key; for an alias: the alias).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    /// `~`, `null` or nothing at all.
    Null,
    /// A string as YAML decoded it (quotes and escapes resolved); any other scalar (number,
    /// boolean) exactly as written, so that `0x5eed` or `yes` reach the schema unchanged.
    Scalar(String),
    Seq(Vec<Node>),
    /// Entries in file order, repeated keys included (the schema reports them).
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// What the node is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing",
            Value::Scalar(_) => "a single value",
            Value::Seq(_) => "a sequence",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Parses one YAML document. A syntax error is the only problem reported: nothing after it
/// can be trusted.
pub(crate) fn parse(text: &str) -> Result<Node, Problem> {
    let mut options = Options::default();
    // Repeated keys reach the tree, where they are reported with both positions.
    options.duplicate_keys = DuplicateKeyPolicy::PassThrough;
    // `.inf` and `.nan` stay text; the schema refuses them where a number is expected.
    options.non_finite_float_policy = NonFiniteFloatPolicy::AsString;
    options.emit_comments = false;
    // A config is small and shallow: refuse alias bombs long before they cost memory, and
    // deep nesting long before it costs stack (each level takes tens of KiB in a debug
    // build, and tokio's worker threads have 2 MiB).
    options.alias_limits.max_total_replayed_events = 100_000;
    let mut budget = Budget::default();
    budget.max_depth = MAX_DEPTH;
    options.budget = Some(budget);
    match serde_saphyr::from_str_with_options::<Spanned<Raw>>(text, options) {
        Ok(root) => Ok(into_node(root, text)),
        Err(error) => {
            let pos = error.location().map_or(Pos::new(1, 0), pos_of);
            let message = UserMessageFormatter.format_message(error.without_snippet());
            // The formatter's text may hold control characters from the input.
            let message: String = message
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_debug().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            Err(Problem::new(pos, format!("invalid YAML: {message}")))
        }
    }
}

fn pos_of(location: Location) -> Pos {
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    Pos::new(clamp(location.line()), clamp(location.column()))
}

/// The node as serde-saphyr hands it over, before scalars are turned back into their text.
enum Raw {
    Null,
    Str(String),
    /// A number or boolean: its text is taken from the source by its span.
    Other(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<Raw>, Spanned<Raw>)>),
}

fn into_node(raw: Spanned<Raw>, text: &str) -> Node {
    let Spanned {
        value,
        referenced,
        defined,
    } = raw;
    let value = match value {
        Raw::Null => Value::Null,
        Raw::Str(s) => Value::Scalar(s),
        Raw::Other(fallback) => {
            // `defined`: for an alias, the anchored scalar rather than the `*name` token.
            let span = defined.span();
            let source = span
                .byte_offset()
                .zip(span.byte_len())
                .and_then(|(offset, len)| {
                    let start = usize::try_from(offset).ok()?;
                    let end = start.checked_add(usize::try_from(len).ok()?)?;
                    text.get(start..end)
                })
                .filter(|s| !s.is_empty());
            Value::Scalar(source.map_or(fallback, str::to_owned))
        }
        Raw::Seq(items) => Value::Seq(items.into_iter().map(|n| into_node(n, text)).collect()),
        Raw::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (into_node(k, text), into_node(v, text)))
                .collect(),
        ),
    };
    Node {
        pos: pos_of(referenced),
        value,
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Raw, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Other(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Other(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Other(v.to_string()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Raw, E> {
        Ok(Raw::Other(v.to_string()))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
        Ok(Raw::Other(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Other(v.to_string()))
    }

    fn visit_char<E: de::Error>(self, v: char) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Raw, E> {
        Ok(Raw::Str(String::from_utf8_lossy(v).into_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Raw::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(node: &Node) -> &[(Node, Node)] {
        match &node.value {
            Value::Map(entries) => entries,
            other => panic!("expected a mapping, got {other:?}"),
        }
    }

    #[test]
    fn scalars_keep_their_text_and_position() {
        let root = parse("a: 0x5eed\nb: yes\n\"c\": '10%'\nd:\n").expect("valid YAML");
        let entries = map(&root);
        let texts: Vec<(Pos, &Value)> = entries.iter().map(|(_, v)| (v.pos, &v.value)).collect();
        assert_eq!(
            texts,
            [
                (Pos::new(1, 4), &Value::Scalar("0x5eed".into())),
                (Pos::new(2, 4), &Value::Scalar("yes".into())),
                (Pos::new(3, 6), &Value::Scalar("10%".into())),
                (Pos::new(4, 2), &Value::Null),
            ]
        );
    }

    #[test]
    fn repeated_keys_reach_the_tree() {
        let root = parse("a: 1\na: 2\n").expect("valid YAML");
        assert_eq!(map(&root).len(), 2);
    }

    #[test]
    fn syntax_error_has_a_position() {
        let problem = parse("a: [1, 2\nb: 3\n").expect_err("invalid YAML");
        assert_eq!(problem.pos.line, 2);
        assert!(problem.message.starts_with("invalid YAML: "), "{problem:?}");
    }
}
