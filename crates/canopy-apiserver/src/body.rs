//! Decoding request bodies: JSON (reporting duplicate fields, which `serde_json::Value`
//! would silently collapse) and YAML, with nesting bounded so that no body can exhaust the
//! stack.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Deepest nesting accepted in a body. Later stages (schema checks, patches, field
/// management) recurse too; this keeps all of them well inside a worker thread's stack.
const MAX_DEPTH: usize = 500;

/// A decoded body and the paths of fields that appeared twice.
pub struct Decoded {
    /// The document (later duplicates win, as upstream's non-strict decoding).
    pub value: Value,
    /// Paths such as `spec.replicas` of duplicated fields.
    pub duplicates: Vec<String>,
}

struct Seed<'a> {
    path: String,
    depth: usize,
    duplicates: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("exceeded max depth"));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Seed {
            path: format!("{}[{}]", self.path, out.len()),
            depth: self.depth + 1,
            duplicates: self.duplicates,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("exceeded max depth"));
        }
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            let value = map.next_value_seed(Seed {
                path: path.clone(),
                depth: self.depth + 1,
                duplicates: self.duplicates,
            })?;
            if out.insert(key, value).is_some() {
                self.duplicates.push(path);
            }
        }
        Ok(Value::Object(out))
    }
}

/// Decodes a JSON body.
pub fn json(bytes: &[u8]) -> Result<Decoded, String> {
    let mut duplicates = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    deserializer.disable_recursion_limit();
    let value = Seed {
        path: String::new(),
        depth: 0,
        duplicates: &mut duplicates,
    }
    .deserialize(&mut deserializer)
    .map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())?;
    Ok(Decoded { value, duplicates })
}

/// Decodes a body by its media type: JSON (also when none is given, as upstream),
/// YAML, or Kubernetes protobuf. Other types are the caller's to refuse.
pub fn by_type(
    kind: Option<crate::request::BodyType>,
    bytes: &[u8],
) -> Option<Result<Decoded, String>> {
    use crate::request::BodyType;
    Some(match kind {
        None | Some(BodyType::Json) => json(bytes),
        Some(BodyType::Yaml) => yaml(bytes),
        Some(BodyType::Protobuf) => canopy_api::protobuf::decode(bytes)
            .map(|d| Decoded {
                value: d.object,
                duplicates: Vec::new(),
            })
            .map_err(|e| e.to_string()),
        Some(_) => return None,
    })
}

/// Decodes a YAML body (a JSON body is YAML too). YAML maps with duplicate keys are an
/// error in the YAML parser itself.
pub fn yaml(bytes: &[u8]) -> Result<Decoded, String> {
    if bytes.iter().any(|b| !b.is_ascii_whitespace()) && looks_like_json(bytes) {
        return json(bytes);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "body is not UTF-8".to_string())?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let value = yaml_to_json(yaml, 0)?;
    Ok(Decoded {
        value,
        duplicates: Vec::new(),
    })
}

fn looks_like_json(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[')
}

fn yaml_to_json(yaml: serde_yaml::Value, depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("exceeded max depth".into());
    }
    Ok(match yaml {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map_or(Value::Null, Value::Number)
            }
        }
        serde_yaml::Value::String(s) => Value::String(s),
        serde_yaml::Value::Sequence(seq) => Value::Array(
            seq.into_iter()
                .map(|v| yaml_to_json(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        serde_yaml::Value::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    serde_yaml::Value::String(s) => s,
                    serde_yaml::Value::Number(n) => n.to_string(),
                    serde_yaml::Value::Bool(b) => b.to_string(),
                    _ => return Err("YAML mapping keys must be scalars".into()),
                };
                out.insert(key, yaml_to_json(v, depth + 1)?);
            }
            Value::Object(out)
        }
        serde_yaml::Value::Tagged(tagged) => yaml_to_json(tagged.value, depth + 1)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_duplicates_with_paths() {
        let d = json(br#"{"a":1,"spec":{"x":1,"x":2},"l":[{"k":1,"k":2}]}"#).unwrap();
        assert_eq!(d.duplicates, vec!["spec.x", "l[0].k"]);
        assert_eq!(d.value["spec"]["x"], 2);
    }

    #[test]
    fn rejects_garbage_and_deep_nesting() {
        assert!(json(b"{").is_err());
        assert!(json(b"{} x").is_err());
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(json(deep.as_bytes()).is_err());
        let deep_yaml = "[".repeat(5000) + &"]".repeat(5000);
        assert!(yaml(deep_yaml.as_bytes()).is_err());
    }

    #[test]
    fn yaml_bodies() {
        let d = yaml(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: '1'\n")
            .unwrap();
        assert_eq!(d.value["metadata"]["name"], "x");
        assert!(
            yaml(b"a: 1\na: 2\n").is_err(),
            "duplicate YAML keys are rejected"
        );
    }
}
