//! Kubernetes' protobuf request bodies (`application/vnd.kubernetes.protobuf`), decoded into
//! the JSON form every other layer of Canopy works with.
//!
//! kubectl's typed clients (`kubectl create namespace|configmap|secret|deployment|...`) send
//! protobuf. The body is upstream's envelope: the magic `k8s\0`, then a `runtime.Unknown`
//! message holding the `apiVersion` and `kind` and, as raw bytes, the object's own message.
//! The object is converted field by field with the layouts of
//! `generated/proto_messages.rs` (written by `tools/gen-proto-messages.py`), see [`message`].
//!
//! client-go (gogo-protobuf) writes every non-pointer Go field, zero values included, so a
//! decoded body carries fields such as `"generateName": ""` or `"generation": 0` that a
//! JSON body would leave out. They are Go zero values, which upstream cannot tell from
//! unset fields either: Canopy's defaulting and validation treat them the same way. Pointer
//! fields set to zero (`replicas: 0`, `runAsUser: 0`) keep their meaning.

use base64::Engine;
use prost::bytes::Buf;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use serde_json::{Map, Number, Value};

use crate::generated::proto_messages::PROTO_MESSAGES;
use crate::registry::BUILTIN;

/// The media type of Kubernetes' protobuf encoding.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// The bytes every Kubernetes protobuf body starts with (`k8s`, then the encoding style 0:
/// a `runtime.Unknown` message follows).
pub const MAGIC: [u8; 4] = *b"k8s\0";

/// The deepest nesting of messages (and of unknown groups within them) a body may have.
/// The served kinds nest about 15 levels; the bound keeps hostile input from exhausting
/// the stack.
pub const MAX_DEPTH: usize = 128;

/// The protobuf type of a field (of a map's values for [`Label::Map`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `string`: a JSON string.
    String,
    /// `bool`.
    Bool,
    /// `int32`.
    Int32,
    /// `int64`.
    Int64,
    /// `double`.
    Double,
    /// `bytes` (Go `[]byte`): a base64 JSON string.
    Bytes,
    /// A nested message, by definition name, e.g. `io.k8s.api.core.v1.ContainerPort`.
    Message(&'static str),
}

/// How a field occurs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// At most once (a later occurrence overrides, or merges into a message).
    Single,
    /// A list: each occurrence adds items.
    Repeated,
    /// `map<string, V>`: each occurrence is one entry message {key = 1, value = 2}.
    Map,
    /// A Go struct embedded with `json:",inline"`: a nested message on the wire whose
    /// fields are fields of the enclosing JSON object.
    Inline,
}

/// Messages whose JSON form is not an object of their fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    /// `metav1.Time` {seconds = 1, nanos = 2}: RFC 3339 with seconds precision.
    Time,
    /// `metav1.MicroTime` {seconds = 1, nanos = 2}: RFC 3339 with 6 fractional digits.
    MicroTime,
    /// `metav1.Duration` {duration = 1, nanoseconds}: a Go duration string such as `1m30s`.
    Duration,
    /// `resource.Quantity` {string = 1}: the quantity's string.
    Quantity,
    /// `intstr.IntOrString` {type = 1, intVal = 2, strVal = 3}: a number or a string.
    IntOrString,
    /// `runtime.RawExtension` {raw = 1}: JSON bytes, embedded as the value they encode.
    RawExtension,
    /// `metav1.FieldsV1` {raw = 1}: JSON bytes, embedded as the value they encode.
    FieldsV1,
}

/// One field of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// The protobuf field number.
    pub tag: u32,
    /// The JSON name (empty for [`Label::Inline`]).
    pub json: &'static str,
    /// The type of the value.
    pub kind: Kind,
    /// How it occurs.
    pub label: Label,
}

/// The layout of one protobuf message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageDef {
    /// The definition name, e.g. `io.k8s.api.core.v1.Pod`.
    pub definition: &'static str,
    /// Set for the messages decoded by hand; their `fields` are empty.
    pub special: Option<Special>,
    /// The fields, sorted by tag.
    pub fields: &'static [Field],
}

impl MessageDef {
    /// The field with a tag.
    pub fn field(&self, tag: u32) -> Option<&'static Field> {
        self.fields
            .binary_search_by_key(&tag, |f| f.tag)
            .ok()
            .map(|i| &self.fields[i])
    }
}

/// The layout of a message by definition name (any message reachable from the served
/// kinds, DeleteOptions, Status, autoscaling/v1 Scale and core/v1 Binding).
pub fn message(definition: &str) -> Option<&'static MessageDef> {
    find(PROTO_MESSAGES, definition)
}

fn find(table: &'static [MessageDef], definition: &str) -> Option<&'static MessageDef> {
    table
        .binary_search_by(|m| m.definition.cmp(definition))
        .ok()
        .map(|i| &table[i])
}

/// A decoded body.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// The `apiVersion` of the envelope, e.g. `apps/v1`.
    pub api_version: String,
    /// The `kind` of the envelope, e.g. `Deployment`.
    pub kind: String,
    /// The object in Kubernetes' JSON form, `apiVersion` and `kind` included.
    pub object: Value,
}

/// Why a body could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// No bytes at all.
    #[error("empty data")]
    Empty,
    /// The magic prefix is missing.
    #[error(
        "provided data does not appear to be a protobuf message, expected prefix [107 56 115 0]"
    )]
    NotProtobuf,
    /// Only the magic prefix.
    #[error("empty body")]
    EmptyBody,
    /// The envelope names no kind.
    #[error("Object 'Kind' is missing in protobuf envelope (apiVersion {api_version:?})")]
    MissingKind {
        /// The envelope's apiVersion.
        api_version: String,
    },
    /// The envelope names no apiVersion.
    #[error("Object 'apiVersion' is missing in protobuf envelope (kind {kind:?})")]
    MissingVersion {
        /// The envelope's kind.
        kind: String,
    },
    /// A kind that is not served (or not accepted as a protobuf body).
    #[error("no kind {kind:?} is registered for version {api_version:?}")]
    UnknownKind {
        /// The envelope's apiVersion.
        api_version: String,
        /// The envelope's kind.
        kind: String,
    },
    /// The envelope declares its object compressed or in another encoding.
    #[error("unsupported protobuf envelope: {field} is {value:?}")]
    UnsupportedEnvelope {
        /// `contentEncoding` or `contentType`.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// Bytes that are not valid protobuf (truncated, overlong, bad lengths or keys).
    #[error("malformed protobuf at {path}: {detail}")]
    Malformed {
        /// JSON path of the message or field being read.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A known field encoded with another wire type than its protobuf type has.
    #[error("wrong wire type for {path}: expected {expected}, found {found}")]
    WrongWireType {
        /// JSON path of the field.
        path: String,
        /// The wire type of the field's type.
        expected: &'static str,
        /// The wire type found.
        found: &'static str,
    },
    /// Well-formed protobuf holding a value that has no JSON form.
    #[error("invalid value at {path}: {detail}")]
    InvalidValue {
        /// JSON path of the value.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Messages or groups nested beyond [`MAX_DEPTH`].
    #[error("protobuf nested more than {MAX_DEPTH} levels deep at {path}")]
    TooDeep {
        /// JSON path where the limit was reached.
        path: String,
    },
    /// A message layout missing from the generated table (a stale table).
    #[error("no protobuf layout for {0}")]
    UnknownMessage(String),
}

/// Decodes a Kubernetes protobuf body into the kind's JSON object.
///
/// Accepts the served kinds, `DeleteOptions` (in any served group version or
/// `meta.k8s.io/v1`), core/v1 `Binding`, authentication/v1 `TokenRequest` and
/// autoscaling/v1 `Scale`.
pub fn decode(bytes: &[u8]) -> Result<Decoded, ProtoError> {
    let envelope = Envelope::parse(bytes)?;
    let definition = root_definition(&envelope.api_version, &envelope.kind).ok_or_else(|| {
        ProtoError::UnknownKind {
            api_version: envelope.api_version.clone(),
            kind: envelope.kind.clone(),
        }
    })?;
    let decoder = Decoder {
        table: PROTO_MESSAGES,
    };
    let def = decoder.lookup(definition)?;
    let mut object = Map::new();
    decoder.message(def, envelope.raw, &Path::root(), 1, &mut object)?;
    // Upstream sets the decoded object's type from the envelope.
    object.insert(
        "apiVersion".into(),
        Value::String(envelope.api_version.clone()),
    );
    object.insert("kind".into(), Value::String(envelope.kind.clone()));
    Ok(Decoded {
        api_version: envelope.api_version,
        kind: envelope.kind,
        object: Value::Object(object),
    })
}

fn root_definition(api_version: &str, kind: &str) -> Option<&'static str> {
    if let Some(r) = BUILTIN
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
    {
        return Some(r.definition);
    }
    match kind {
        // Upstream registers the option types in every group version and in meta.k8s.io/v1.
        "DeleteOptions"
            if api_version == "meta.k8s.io/v1"
                || BUILTIN.iter().any(|r| r.api_version() == api_version) =>
        {
            Some("io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions")
        }
        "Binding" if api_version == "v1" => Some("io.k8s.api.core.v1.Binding"),
        "TokenRequest" if api_version == "authentication.k8s.io/v1" => {
            Some("io.k8s.api.authentication.v1.TokenRequest")
        }
        "Scale" if api_version == "autoscaling/v1" => Some("io.k8s.api.autoscaling.v1.Scale"),
        _ => None,
    }
}

/// The `runtime.Unknown` wrapper: typeMeta = 1 {apiVersion = 1, kind = 2}, raw = 2,
/// contentEncoding = 3, contentType = 4.
struct Envelope<'a> {
    api_version: String,
    kind: String,
    raw: &'a [u8],
}

impl<'a> Envelope<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, ProtoError> {
        if bytes.is_empty() {
            return Err(ProtoError::Empty);
        }
        let Some(mut buf) = bytes.strip_prefix(&MAGIC[..]) else {
            return Err(ProtoError::NotProtobuf);
        };
        if buf.is_empty() {
            return Err(ProtoError::EmptyBody);
        }
        let root = Path::root();
        let envelope_path = root.child(Seg::Field("<envelope>"));
        let type_meta_path = envelope_path.child(Seg::Field("typeMeta"));
        let mut envelope = Envelope {
            api_version: String::new(),
            kind: String::new(),
            raw: &[],
        };
        let mut content_encoding = String::new();
        let mut content_type = String::new();
        while buf.has_remaining() {
            let (tag, wire) = key(&mut buf, &envelope_path)?;
            match tag {
                1 => {
                    let mut meta = length_delimited(wire, &mut buf, &type_meta_path)?;
                    while meta.has_remaining() {
                        let (tag, wire) = key(&mut meta, &type_meta_path)?;
                        match tag {
                            1 => envelope.api_version = text(wire, &mut meta, &type_meta_path)?,
                            2 => envelope.kind = text(wire, &mut meta, &type_meta_path)?,
                            _ => skip(wire, tag, &mut meta, &type_meta_path, 2)?,
                        }
                    }
                }
                2 => envelope.raw = length_delimited(wire, &mut buf, &envelope_path)?,
                3 => content_encoding = text(wire, &mut buf, &envelope_path)?,
                4 => content_type = text(wire, &mut buf, &envelope_path)?,
                _ => skip(wire, tag, &mut buf, &envelope_path, 1)?,
            }
        }
        if !content_encoding.is_empty() {
            return Err(ProtoError::UnsupportedEnvelope {
                field: "contentEncoding",
                value: content_encoding,
            });
        }
        if !content_type.is_empty() && content_type != CONTENT_TYPE {
            return Err(ProtoError::UnsupportedEnvelope {
                field: "contentType",
                value: content_type,
            });
        }
        if envelope.kind.is_empty() {
            return Err(ProtoError::MissingKind {
                api_version: envelope.api_version,
            });
        }
        if envelope.api_version.is_empty() {
            return Err(ProtoError::MissingVersion {
                kind: envelope.kind,
            });
        }
        Ok(envelope)
    }
}

/// One step of the JSON path of the value being decoded, kept on the stack and turned
/// into text only for an error.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Root,
    Field(&'static str),
    Index(usize),
    Key(&'a str),
    /// An embedded message: no segment of its own.
    Inline,
}

#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Seg<'a>,
}

impl<'a> Path<'a> {
    fn root() -> Path<'static> {
        Path {
            parent: None,
            seg: Seg::Root,
        }
    }

    fn child<'b>(&'b self, seg: Seg<'b>) -> Path<'b> {
        Path {
            parent: Some(self),
            seg,
        }
    }

    fn render(&self) -> String {
        let mut segs = Vec::new();
        let mut at = Some(self);
        while let Some(p) = at {
            segs.push(p.seg);
            at = p.parent;
        }
        let mut out = String::new();
        for seg in segs.iter().rev() {
            match seg {
                Seg::Root | Seg::Inline => {}
                Seg::Field(name) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(name);
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
                Seg::Key(k) => out.push_str(&format!("[{k}]")),
            }
        }
        if out.is_empty() {
            out.push_str("<object>");
        }
        out
    }
}

fn malformed(path: &Path<'_>, detail: impl std::fmt::Display) -> ProtoError {
    ProtoError::Malformed {
        path: path.render(),
        detail: detail.to_string(),
    }
}

fn invalid(path: &Path<'_>, detail: impl std::fmt::Display) -> ProtoError {
    ProtoError::InvalidValue {
        path: path.render(),
        detail: detail.to_string(),
    }
}

fn wire_name(wire: WireType) -> &'static str {
    match wire {
        WireType::Varint => "varint",
        WireType::SixtyFourBit => "64-bit",
        WireType::LengthDelimited => "length-delimited",
        WireType::StartGroup => "start-group",
        WireType::EndGroup => "end-group",
        WireType::ThirtyTwoBit => "32-bit",
    }
}

fn expect_wire(expected: WireType, found: WireType, path: &Path<'_>) -> Result<(), ProtoError> {
    if expected == found {
        Ok(())
    } else {
        Err(ProtoError::WrongWireType {
            path: path.render(),
            expected: wire_name(expected),
            found: wire_name(found),
        })
    }
}

fn key(buf: &mut &[u8], path: &Path<'_>) -> Result<(u32, WireType), ProtoError> {
    decode_key(buf).map_err(|e| malformed(path, e))
}

fn varint(buf: &mut &[u8], path: &Path<'_>) -> Result<u64, ProtoError> {
    decode_varint(buf).map_err(|e| malformed(path, e))
}

fn fixed64(buf: &mut &[u8], path: &Path<'_>) -> Result<u64, ProtoError> {
    if buf.remaining() < 8 {
        return Err(malformed(path, "buffer underflow"));
    }
    Ok(buf.get_u64_le())
}

/// The payload of a length-delimited field whose key has been read.
fn length_delimited<'b>(
    wire: WireType,
    buf: &mut &'b [u8],
    path: &Path<'_>,
) -> Result<&'b [u8], ProtoError> {
    expect_wire(WireType::LengthDelimited, wire, path)?;
    let len = varint(buf, path)?;
    if len > buf.len() as u64 {
        return Err(malformed(
            path,
            format!("length {len} exceeds the {} bytes that remain", buf.len()),
        ));
    }
    let (head, tail) = buf.split_at(len as usize);
    *buf = tail;
    Ok(head)
}

/// Go's protobuf code does not check strings for UTF-8 and its JSON encoder replaces what
/// is invalid with U+FFFD: the same happens here.
fn text(wire: WireType, buf: &mut &[u8], path: &Path<'_>) -> Result<String, ProtoError> {
    let bytes = length_delimited(wire, buf, path)?;
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Skips a field the layout does not know, as protobuf decoding does. Groups (unused by
/// Kubernetes but valid protobuf) are walked without recursion, within [`MAX_DEPTH`].
fn skip(
    wire: WireType,
    tag: u32,
    buf: &mut &[u8],
    path: &Path<'_>,
    depth: usize,
) -> Result<(), ProtoError> {
    if wire != WireType::StartGroup {
        return skip_field(wire, tag, buf, DecodeContext::default())
            .map_err(|e| malformed(path, e));
    }
    let mut open = vec![tag];
    while let Some(&current) = open.last() {
        if depth + open.len() > MAX_DEPTH {
            return Err(ProtoError::TooDeep {
                path: path.render(),
            });
        }
        let (inner, inner_wire) = key(buf, path)?;
        match inner_wire {
            WireType::EndGroup if inner == current => {
                open.pop();
            }
            WireType::EndGroup => {
                return Err(malformed(
                    path,
                    format!("group {current} closed by end group {inner}"),
                ));
            }
            WireType::StartGroup => open.push(inner),
            _ => skip_field(inner_wire, inner, buf, DecodeContext::default())
                .map_err(|e| malformed(path, e))?,
        }
    }
    Ok(())
}

fn wire_of(kind: Kind) -> WireType {
    match kind {
        Kind::Bool | Kind::Int32 | Kind::Int64 => WireType::Varint,
        Kind::Double => WireType::SixtyFourBit,
        Kind::String | Kind::Bytes | Kind::Message(_) => WireType::LengthDelimited,
    }
}

/// A scalar whose key (of the right wire type) has been read.
fn scalar(kind: Kind, buf: &mut &[u8], path: &Path<'_>) -> Result<Value, ProtoError> {
    Ok(match kind {
        Kind::String => Value::String(text(WireType::LengthDelimited, buf, path)?),
        Kind::Bytes => Value::String(
            base64::engine::general_purpose::STANDARD.encode(length_delimited(
                WireType::LengthDelimited,
                buf,
                path,
            )?),
        ),
        Kind::Bool => Value::Bool(varint(buf, path)? != 0),
        // Truncation to 32 bits is what protobuf (and Go's generated code) does.
        Kind::Int32 => Value::from(varint(buf, path)? as i32),
        Kind::Int64 => Value::from(varint(buf, path)? as i64),
        Kind::Double => double(f64::from_bits(fixed64(buf, path)?), path)?,
        Kind::Message(_) => return Err(invalid(path, "a message is not a scalar")),
    })
}

/// Go's JSON writes a whole float64 without a fraction (`1`, not `1.0`), which a JSON body
/// would then parse as an integer.
fn double(v: f64, path: &Path<'_>) -> Result<Value, ProtoError> {
    if !v.is_finite() {
        return Err(invalid(path, format!("{v} has no JSON form")));
    }
    if v.fract() == 0.0 && v.abs() < 9_007_199_254_740_992.0 {
        return Ok(Value::from(v as i64));
    }
    Number::from_f64(v)
        .map(Value::Number)
        .ok_or_else(|| invalid(path, format!("{v} has no JSON form")))
}

/// The zero value of a map's value type, for an entry without one.
fn zero(kind: Kind) -> Value {
    match kind {
        Kind::String | Kind::Bytes => Value::String(String::new()),
        Kind::Bool => Value::Bool(false),
        Kind::Int32 | Kind::Int64 | Kind::Double => Value::from(0),
        Kind::Message(_) => Value::Null,
    }
}

struct Decoder {
    table: &'static [MessageDef],
}

impl Decoder {
    fn lookup(&self, definition: &str) -> Result<&'static MessageDef, ProtoError> {
        find(self.table, definition).ok_or_else(|| ProtoError::UnknownMessage(definition.into()))
    }

    /// Decodes a message's fields into `out`, merging with what is there as protobuf
    /// merges a message that occurs twice. `depth` counts the messages entered, this one
    /// included.
    fn message(
        &self,
        def: &'static MessageDef,
        mut buf: &[u8],
        path: &Path<'_>,
        depth: usize,
        out: &mut Map<String, Value>,
    ) -> Result<(), ProtoError> {
        if depth > MAX_DEPTH {
            return Err(ProtoError::TooDeep {
                path: path.render(),
            });
        }
        while buf.has_remaining() {
            let (tag, wire) = key(&mut buf, path)?;
            let Some(field) = def.field(tag) else {
                skip(wire, tag, &mut buf, path, depth)?;
                continue;
            };
            let field_path = path.child(Seg::Field(field.json));
            match (field.label, field.kind) {
                (Label::Inline, Kind::Message(target)) => {
                    let inner = length_delimited(wire, &mut buf, path)?;
                    let def = self.lookup(target)?;
                    self.message(def, inner, &path.child(Seg::Inline), depth + 1, out)?;
                }
                (Label::Inline, _) => {
                    return Err(invalid(path, "an embedded field must be a message"));
                }
                (Label::Single, Kind::Message(target)) => {
                    let inner = length_delimited(wire, &mut buf, &field_path)?;
                    let prior = out.remove(field.json);
                    let value = self.value(target, inner, &field_path, depth + 1, prior)?;
                    out.insert(field.json.to_string(), value);
                }
                (Label::Single, kind) => {
                    expect_wire(wire_of(kind), wire, &field_path)?;
                    let value = scalar(kind, &mut buf, &field_path)?;
                    out.insert(field.json.to_string(), value);
                }
                (Label::Repeated, kind) => {
                    let mut items = match out.remove(field.json) {
                        Some(Value::Array(items)) => items,
                        _ => Vec::new(),
                    };
                    self.repeated(kind, wire, &mut buf, &field_path, depth, &mut items)?;
                    out.insert(field.json.to_string(), Value::Array(items));
                }
                (Label::Map, kind) => {
                    let entry = length_delimited(wire, &mut buf, &field_path)?;
                    let (k, v) = self.map_entry(kind, entry, &field_path, depth)?;
                    match out
                        .entry(field.json)
                        .or_insert_with(|| Value::Object(Map::new()))
                    {
                        Value::Object(map) => {
                            map.insert(k, v);
                        }
                        other => *other = Value::Object(Map::from_iter([(k, v)])),
                    }
                }
            }
        }
        Ok(())
    }

    /// One occurrence of a repeated field: one item, or a packed run of numbers (accepted
    /// for any numeric field, as protobuf parsers must, whatever the field's declaration).
    fn repeated(
        &self,
        kind: Kind,
        wire: WireType,
        buf: &mut &[u8],
        path: &Path<'_>,
        depth: usize,
        items: &mut Vec<Value>,
    ) -> Result<(), ProtoError> {
        let packable = matches!(kind, Kind::Bool | Kind::Int32 | Kind::Int64 | Kind::Double);
        if packable && wire == WireType::LengthDelimited {
            let mut run = length_delimited(wire, buf, path)?;
            while run.has_remaining() {
                let item = path.child(Seg::Index(items.len()));
                items.push(scalar(kind, &mut run, &item)?);
            }
            return Ok(());
        }
        let item = path.child(Seg::Index(items.len()));
        expect_wire(wire_of(kind), wire, &item)?;
        let value = match kind {
            Kind::Message(target) => {
                let inner = length_delimited(wire, buf, &item)?;
                self.value(target, inner, &item, depth + 1, None)?
            }
            kind => scalar(kind, buf, &item)?,
        };
        items.push(value);
        Ok(())
    }

    /// A map entry {key = 1, value = 2}; either may be missing (then it is the zero value).
    fn map_entry(
        &self,
        kind: Kind,
        mut entry: &[u8],
        path: &Path<'_>,
        depth: usize,
    ) -> Result<(String, Value), ProtoError> {
        let mut map_key = String::new();
        let mut raw_value: Option<&[u8]> = None;
        let mut value: Option<Value> = None;
        while entry.has_remaining() {
            let (tag, wire) = key(&mut entry, path)?;
            match tag {
                1 => map_key = text(wire, &mut entry, path)?,
                2 => {
                    expect_wire(wire_of(kind), wire, path)?;
                    match kind {
                        // Decoded once the key (which may come later) is known, for the path.
                        Kind::Message(_) => {
                            raw_value = Some(length_delimited(wire, &mut entry, path)?)
                        }
                        kind => value = Some(scalar(kind, &mut entry, path)?),
                    }
                }
                _ => skip(wire, tag, &mut entry, path, depth + 1)?,
            }
        }
        let value = match kind {
            Kind::Message(target) => {
                let item = path.child(Seg::Key(&map_key));
                self.value(target, raw_value.unwrap_or(&[]), &item, depth + 1, None)?
            }
            kind => value.unwrap_or_else(|| zero(kind)),
        };
        Ok((map_key, value))
    }

    /// The JSON value of a nested message.
    fn value(
        &self,
        target: &str,
        bytes: &[u8],
        path: &Path<'_>,
        depth: usize,
        prior: Option<Value>,
    ) -> Result<Value, ProtoError> {
        let def = self.lookup(target)?;
        if let Some(special) = def.special {
            if depth > MAX_DEPTH {
                return Err(ProtoError::TooDeep {
                    path: path.render(),
                });
            }
            return special_value(special, bytes, path, depth);
        }
        let mut object = match prior {
            Some(Value::Object(object)) => object,
            _ => Map::new(),
        };
        self.message(def, bytes, path, depth, &mut object)?;
        Ok(Value::Object(object))
    }
}

/// The fields of a special message, by tag, as raw scalars.
#[derive(Default)]
struct SpecialFields<'b> {
    varints: [Option<u64>; 4],
    bytes: [Option<&'b [u8]>; 4],
}

/// Reads the fields (tags 1 to 3) of a special message whose wire types are given by
/// `wires[tag]`; unknown tags are skipped.
fn special_fields<'b>(
    mut buf: &'b [u8],
    wires: [Option<WireType>; 4],
    path: &Path<'_>,
    depth: usize,
) -> Result<SpecialFields<'b>, ProtoError> {
    let mut fields = SpecialFields::default();
    while buf.has_remaining() {
        let (tag, wire) = key(&mut buf, path)?;
        let idx = tag as usize;
        match wires.get(idx).copied().flatten() {
            Some(WireType::Varint) => {
                expect_wire(WireType::Varint, wire, path)?;
                fields.varints[idx] = Some(varint(&mut buf, path)?);
            }
            Some(WireType::LengthDelimited) => {
                fields.bytes[idx] = Some(length_delimited(wire, &mut buf, path)?);
            }
            _ => skip(wire, tag, &mut buf, path, depth)?,
        }
    }
    Ok(fields)
}

const V: Option<WireType> = Some(WireType::Varint);
const LD: Option<WireType> = Some(WireType::LengthDelimited);

fn special_value(
    special: Special,
    bytes: &[u8],
    path: &Path<'_>,
    depth: usize,
) -> Result<Value, ProtoError> {
    match special {
        Special::Time | Special::MicroTime => {
            // An empty message is Go's zero time, which its JSON writes as null.
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            let f = special_fields(bytes, [None, V, V, None], path, depth)?;
            let seconds = f.varints[1].unwrap_or(0) as i64;
            let nanos = f.varints[2].unwrap_or(0) as i32;
            time(seconds, nanos, special == Special::MicroTime, path)
        }
        Special::Duration => {
            let f = special_fields(bytes, [None, V, None, None], path, depth)?;
            Ok(Value::String(go_duration(f.varints[1].unwrap_or(0) as i64)))
        }
        Special::Quantity => {
            let f = special_fields(bytes, [None, LD, None, None], path, depth)?;
            Ok(Value::String(match f.bytes[1] {
                Some(s) => String::from_utf8_lossy(s).into_owned(),
                // Go's zero Quantity.
                None => "0".to_string(),
            }))
        }
        Special::IntOrString => {
            let f = special_fields(bytes, [None, V, V, LD], path, depth)?;
            match f.varints[1].unwrap_or(0) {
                0 => Ok(Value::from(f.varints[2].unwrap_or(0) as i32)),
                1 => Ok(Value::String(
                    String::from_utf8_lossy(f.bytes[3].unwrap_or(&[])).into_owned(),
                )),
                other => Err(invalid(
                    path,
                    format!(
                        "IntOrString type {} is neither 0 (int) nor 1 (string)",
                        other as i64
                    ),
                )),
            }
        }
        Special::RawExtension | Special::FieldsV1 => {
            let f = special_fields(bytes, [None, LD, None, None], path, depth)?;
            match f.bytes[1] {
                None | Some([]) => Ok(Value::Null),
                Some(raw) => serde_json::from_slice(raw)
                    .map_err(|e| invalid(path, format!("embedded JSON: {e}"))),
            }
        }
    }
}

/// Go's `time.Unix(seconds, nanos)` written as metav1.Time (`2006-01-02T15:04:05Z`) or
/// metav1.MicroTime (`2006-01-02T15:04:05.000000Z`) writes it.
fn time(seconds: i64, nanos: i32, micro: bool, path: &Path<'_>) -> Result<Value, ProtoError> {
    let out_of_range = || invalid(path, format!("time {seconds}s {nanos}ns is out of range"));
    let seconds = seconds
        .checked_add(i64::from(nanos).div_euclid(1_000_000_000))
        .ok_or_else(out_of_range)?;
    let nanos = i64::from(nanos).rem_euclid(1_000_000_000) as u32;
    // Go's zero time (January 1, year 1), which its JSON writes as null.
    if seconds == -62_135_596_800 && nanos == 0 {
        return Ok(Value::Null);
    }
    let t = chrono::DateTime::from_timestamp(seconds, nanos).ok_or_else(out_of_range)?;
    if !(0..=9999).contains(&chrono::Datelike::year(&t)) {
        return Err(out_of_range());
    }
    let base = t.format("%Y-%m-%dT%H:%M:%S");
    Ok(Value::String(if micro {
        format!("{base}.{:06}Z", nanos / 1000)
    } else {
        format!("{base}Z")
    }))
}

/// Go's `time.Duration.String`: `1h2m3.5s`, `1.5ms`, `0s`.
fn go_duration(nanoseconds: i64) -> String {
    let sign = if nanoseconds < 0 { "-" } else { "" };
    let u = nanoseconds.unsigned_abs();
    if u == 0 {
        return "0s".into();
    }
    // The fraction of v / 10^prec without trailing zeros, and the integer part.
    let split = |v: u64, prec: u32| {
        let scale = 10u64.pow(prec);
        let frac = v % scale;
        let text = if frac == 0 {
            String::new()
        } else {
            let digits = format!("{frac:0width$}", width = prec as usize);
            format!(".{}", digits.trim_end_matches('0'))
        };
        (v / scale, text)
    };
    if u < 1_000_000_000 {
        let (unit, prec) = if u < 1_000 {
            ("ns", 0)
        } else if u < 1_000_000 {
            ("µs", 3)
        } else {
            ("ms", 6)
        };
        let (int, frac) = split(u, prec);
        return format!("{sign}{int}{frac}{unit}");
    }
    let (seconds, frac) = split(u, 9);
    let (minutes, s) = (seconds / 60, seconds % 60);
    let (hours, m) = (minutes / 60, minutes % 60);
    if hours > 0 {
        format!("{sign}{hours}h{m}m{s}{frac}s")
    } else if minutes > 0 {
        format!("{sign}{m}m{s}{frac}s")
    } else {
        format!("{sign}{s}{frac}s")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_pb::api::apps::v1 as apps;
    use k8s_pb::api::authentication::v1 as authentication;
    use k8s_pb::api::autoscaling::v1 as autoscaling;
    use k8s_pb::api::coordination::v1 as coordination;
    use k8s_pb::api::core::v1 as core;
    use k8s_pb::apimachinery::pkg::api::resource::Quantity;
    use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
    use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
    use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
    use prost::Message;
    use prost::encoding::{encode_key, encode_varint};
    use serde_json::json;

    use super::*;

    /// The body client-go's protobuf serializer writes (NestedMarshalTo): the magic, then
    /// runtime.Unknown with every field present, the two content fields empty.
    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        unknown.encode(&mut out).unwrap();
        out
    }

    fn object(api_version: &str, kind: &str, obj: &impl Message) -> Value {
        let decoded = decode(&envelope(api_version, kind, obj.encode_to_vec())).unwrap();
        assert_eq!(decoded.api_version, api_version);
        assert_eq!(decoded.kind, kind);
        decoded.object
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn name(n: &str) -> Option<meta::ObjectMeta> {
        Some(meta::ObjectMeta {
            name: s(n),
            ..Default::default()
        })
    }

    fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity { string: s(v) }))
            .collect()
    }

    fn int(i: i32) -> Option<IntOrString> {
        Some(IntOrString {
            r#type: Some(0),
            int_val: Some(i),
            str_val: None,
        })
    }

    fn string(v: &str) -> Option<IntOrString> {
        Some(IntOrString {
            r#type: Some(1),
            int_val: None,
            str_val: s(v),
        })
    }

    fn tag(definition: &str, json: &str) -> u32 {
        message(definition)
            .unwrap()
            .fields
            .iter()
            .find(|f| f.json == json)
            .unwrap()
            .tag
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/testdata/protobuf/{name}.pb", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The metadata client-go writes for an ObjectMeta with only a name (and labels): every
    /// non-pointer field at its zero value, the zero creationTimestamp as an empty message.
    fn zero_meta(name: &str) -> Value {
        json!({
            "name": name, "generateName": "", "namespace": "", "selfLink": "", "uid": "",
            "resourceVersion": "", "generation": 0, "creationTimestamp": null
        })
    }

    fn with(mut base: Value, extra: Value) -> Value {
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    // The fixtures are request bodies of kubectl 1.33 (`kubectl create ...` against a stub
    // server that recorded them).

    #[test]
    fn kubectl_create_namespace() {
        let d = decode(&fixture("namespace")).unwrap();
        assert_eq!(
            (d.api_version.as_str(), d.kind.as_str()),
            ("v1", "Namespace")
        );
        assert_eq!(
            d.object,
            json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": zero_meta("foo"),
                "spec": {}, "status": {"phase": ""}
            })
        );
    }

    #[test]
    fn kubectl_create_configmap_and_secrets() {
        // --from-literal=greeting=hello --from-literal=empty= --from-file=blob=<00 01 ff fe>
        assert_eq!(
            decode(&fixture("configmap")).unwrap().object,
            json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": zero_meta("cm1"),
                "data": {"greeting": "hello", "empty": ""},
                "binaryData": {"blob": "AAH//g=="}
            })
        );
        assert_eq!(
            decode(&fixture("secret-generic")).unwrap().object,
            json!({
                "apiVersion": "v1", "kind": "Secret", "metadata": zero_meta("s1"),
                "data": {"password": "aHVudGVyMg=="}, "type": "Opaque"
            })
        );
        let registry = decode(&fixture("secret-docker-registry")).unwrap().object;
        assert_eq!(registry["type"], "kubernetes.io/dockerconfigjson");
        let config = base64::engine::general_purpose::STANDARD
            .decode(registry["data"][".dockerconfigjson"].as_str().unwrap())
            .unwrap();
        let config: Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["auths"]["r.example"]["username"], "u");
        assert_eq!(
            decode(&fixture("serviceaccount")).unwrap().object,
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": zero_meta("sa1")})
        );
    }

    #[test]
    fn kubectl_create_deployment() {
        let d = decode(&fixture("deployment")).unwrap().object;
        let labels = json!({"labels": {"app": "web"}});
        assert_eq!(
            d,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": with(zero_meta("web"), labels.clone()),
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": with(zero_meta(""), labels),
                        "spec": {
                            "containers": [{
                                "name": "nginx", "image": "nginx:1.27",
                                "ports": [{"containerPort": 8080, "hostIP": "", "hostPort": 0,
                                           "name": "", "protocol": ""}],
                                "resources": {}, "workingDir": "", "imagePullPolicy": "",
                                "terminationMessagePath": "", "terminationMessagePolicy": "",
                                "stdin": false, "stdinOnce": false, "tty": false
                            }],
                            "restartPolicy": "", "dnsPolicy": "", "serviceAccountName": "",
                            "serviceAccount": "", "nodeName": "", "hostNetwork": false,
                            "hostPID": false, "hostIPC": false, "hostname": "", "subdomain": "",
                            "schedulerName": "", "priorityClassName": ""
                        }
                    },
                    "strategy": {"type": ""}, "minReadySeconds": 0, "paused": false
                },
                "status": {
                    "observedGeneration": 0, "replicas": 0, "updatedReplicas": 0,
                    "readyReplicas": 0, "availableReplicas": 0, "unavailableReplicas": 0
                }
            })
        );
        // A pointer set to zero is on the wire, unlike an unset one: `--replicas=0` stays 0.
        let zero = decode(&fixture("deployment-zero-replicas")).unwrap().object;
        assert_eq!(zero["spec"]["replicas"], 0);
        assert_eq!(
            zero["spec"]["template"]["spec"]["containers"][0]["command"],
            json!(["sleep", "3600"])
        );
    }

    #[test]
    fn kubectl_create_service() {
        let spec = |name: &str, port: i64, target: Value, kind: &str| {
            json!({
                "ports": [{"name": name, "protocol": "TCP", "port": port, "targetPort": target,
                           "nodePort": 0}],
                "selector": {"app": if kind == "ClusterIP" { "svc1" } else { "svc2" }},
                "clusterIP": "", "type": kind, "sessionAffinity": "", "loadBalancerIP": "",
                "externalName": "", "externalTrafficPolicy": "", "healthCheckNodePort": 0,
                "publishNotReadyAddresses": false
            })
        };
        assert_eq!(
            decode(&fixture("service-clusterip")).unwrap().object,
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": with(zero_meta("svc1"), json!({"labels": {"app": "svc1"}})),
                "spec": spec("80-8080", 80, json!(8080), "ClusterIP"),
                "status": {"loadBalancer": {}}
            })
        );
        let nodeport = decode(&fixture("service-nodeport")).unwrap().object;
        assert_eq!(
            nodeport["spec"],
            spec("443-https", 443, json!("https"), "NodePort")
        );
    }

    #[test]
    fn kinds_that_are_not_served_are_rejected() {
        assert_eq!(
            decode(&fixture("role")).unwrap_err(),
            ProtoError::UnknownKind {
                api_version: "rbac.authorization.k8s.io/v1".into(),
                kind: "Role".into()
            }
        );
        let pod = core::Pod {
            metadata: name("p"),
            ..Default::default()
        };
        // The right kind in the wrong group version.
        assert!(matches!(
            decode(&envelope("apps/v1", "Pod", pod.encode_to_vec())),
            Err(ProtoError::UnknownKind { .. })
        ));
        assert!(matches!(
            decode(&envelope(
                "rbac.authorization.k8s.io/v1",
                "DeleteOptions",
                vec![]
            )),
            Err(ProtoError::UnknownKind { .. })
        ));
    }

    #[test]
    fn namespace_configmap_secret() {
        let ns = core::Namespace {
            metadata: Some(meta::ObjectMeta {
                name: s("ns1"),
                labels: strings(&[("team", "a")]),
                ..Default::default()
            }),
            spec: Some(core::NamespaceSpec {
                finalizers: vec!["kubernetes".into()],
            }),
            status: None,
        };
        assert_eq!(
            object("v1", "Namespace", &ns),
            json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "ns1", "labels": {"team": "a"}},
                "spec": {"finalizers": ["kubernetes"]}
            })
        );

        let cm = core::ConfigMap {
            metadata: Some(meta::ObjectMeta {
                name: s("cm"),
                namespace: s("default"),
                annotations: strings(&[("note", "ünïcode ✓")]),
                ..Default::default()
            }),
            immutable: Some(false),
            data: strings(&[("a.txt", "line 1\nline 2"), ("empty", "")]),
            binary_data: [("bin".to_string(), vec![0u8, 1, 2, 255])].into(),
        };
        assert_eq!(
            object("v1", "ConfigMap", &cm),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cm", "namespace": "default",
                             "annotations": {"note": "ünïcode ✓"}},
                "immutable": false,
                "data": {"a.txt": "line 1\nline 2", "empty": ""},
                "binaryData": {"bin": "AAEC/w=="}
            })
        );

        let secret = core::Secret {
            metadata: name("s"),
            immutable: Some(true),
            data: [("password".to_string(), b"hunter2".to_vec())].into(),
            string_data: strings(&[("user", "admin")]),
            r#type: s("Opaque"),
        };
        assert_eq!(
            object("v1", "Secret", &secret),
            json!({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                "immutable": true, "data": {"password": "aHVudGVyMg=="},
                "stringData": {"user": "admin"}, "type": "Opaque"
            })
        );
    }

    fn pod_template() -> core::PodTemplateSpec {
        let container = core::Container {
            name: s("web"),
            image: s("nginx:1.27"),
            command: vec!["nginx".into()],
            args: vec!["-g".into(), "daemon off;".into()],
            ports: vec![core::ContainerPort {
                name: s("http"),
                container_port: Some(80),
                protocol: s("TCP"),
                ..Default::default()
            }],
            env: vec![
                core::EnvVar {
                    name: s("MODE"),
                    value: s("prod"),
                    value_from: None,
                },
                core::EnvVar {
                    name: s("TOKEN"),
                    value: None,
                    value_from: Some(core::EnvVarSource {
                        secret_key_ref: Some(core::SecretKeySelector {
                            local_object_reference: Some(core::LocalObjectReference {
                                name: s("creds"),
                            }),
                            key: s("token"),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    }),
                },
            ],
            resources: Some(core::ResourceRequirements {
                limits: quantities(&[("cpu", "500m"), ("memory", "128Mi")]),
                requests: quantities(&[("cpu", "250m")]),
                claims: vec![],
            }),
            liveness_probe: Some(core::Probe {
                handler: Some(core::ProbeHandler {
                    http_get: Some(core::HttpGetAction {
                        path: s("/healthz"),
                        port: string("http"),
                        scheme: s("HTTP"),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                initial_delay_seconds: Some(3),
                period_seconds: Some(10),
                ..Default::default()
            }),
            readiness_probe: Some(core::Probe {
                handler: Some(core::ProbeHandler {
                    tcp_socket: Some(core::TcpSocketAction {
                        port: int(80),
                        host: None,
                    }),
                    ..Default::default()
                }),
                failure_threshold: Some(3),
                ..Default::default()
            }),
            volume_mounts: vec![core::VolumeMount {
                name: s("config"),
                mount_path: s("/etc/nginx/conf.d"),
                read_only: Some(true),
                ..Default::default()
            }],
            ..Default::default()
        };
        core::PodTemplateSpec {
            metadata: Some(meta::ObjectMeta {
                labels: strings(&[("app", "web")]),
                annotations: strings(&[("prometheus.io/scrape", "true")]),
                ..Default::default()
            }),
            spec: Some(core::PodSpec {
                containers: vec![container],
                volumes: vec![core::Volume {
                    name: s("config"),
                    volume_source: Some(core::VolumeSource {
                        config_map: Some(core::ConfigMapVolumeSource {
                            local_object_reference: Some(core::LocalObjectReference {
                                name: s("nginx-conf"),
                            }),
                            default_mode: Some(0o644),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                }],
                tolerations: vec![
                    core::Toleration {
                        key: s("node.kubernetes.io/not-ready"),
                        operator: s("Exists"),
                        effect: s("NoExecute"),
                        toleration_seconds: Some(300),
                        value: None,
                    },
                    core::Toleration {
                        key: s("dedicated"),
                        operator: s("Equal"),
                        value: s("web"),
                        effect: s("NoSchedule"),
                        toleration_seconds: None,
                    },
                ],
                security_context: Some(core::PodSecurityContext {
                    run_as_user: Some(0),
                    run_as_non_root: Some(false),
                    supplemental_groups: vec![1000, 2000],
                    ..Default::default()
                }),
                node_selector: strings(&[("kubernetes.io/os", "linux")]),
                termination_grace_period_seconds: Some(30),
                automount_service_account_token: Some(false),
                ..Default::default()
            }),
        }
    }

    fn pod_template_json() -> Value {
        json!({
            "metadata": {"labels": {"app": "web"},
                         "annotations": {"prometheus.io/scrape": "true"}},
            "spec": {
                "containers": [{
                    "name": "web", "image": "nginx:1.27", "command": ["nginx"],
                    "args": ["-g", "daemon off;"],
                    "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
                    "env": [
                        {"name": "MODE", "value": "prod"},
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {
                            "name": "creds", "key": "token", "optional": false}}}
                    ],
                    "resources": {"limits": {"cpu": "500m", "memory": "128Mi"},
                                  "requests": {"cpu": "250m"}},
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                                                  "scheme": "HTTP"},
                                      "initialDelaySeconds": 3, "periodSeconds": 10},
                    "readinessProbe": {"tcpSocket": {"port": 80}, "failureThreshold": 3},
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/nginx/conf.d",
                                      "readOnly": true}]
                }],
                "volumes": [{"name": "config",
                             "configMap": {"name": "nginx-conf", "defaultMode": 420}}],
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                     "effect": "NoExecute", "tolerationSeconds": 300},
                    {"key": "dedicated", "operator": "Equal", "value": "web",
                     "effect": "NoSchedule"}
                ],
                "securityContext": {"runAsUser": 0, "runAsNonRoot": false,
                                    "supplementalGroups": [1000, 2000]},
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "terminationGracePeriodSeconds": 30,
                "automountServiceAccountToken": false
            }
        })
    }

    #[test]
    fn deployment_with_a_full_pod_template() {
        let deployment = apps::Deployment {
            metadata: Some(meta::ObjectMeta {
                name: s("web"),
                namespace: s("prod"),
                generation: Some(4),
                ..Default::default()
            }),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(2),
                selector: Some(meta::LabelSelector {
                    match_labels: strings(&[("app", "web")]),
                    match_expressions: vec![meta::LabelSelectorRequirement {
                        key: s("tier"),
                        operator: s("In"),
                        values: vec!["frontend".into(), "edge".into()],
                    }],
                }),
                template: Some(pod_template()),
                strategy: Some(apps::DeploymentStrategy {
                    r#type: s("RollingUpdate"),
                    rolling_update: Some(apps::RollingUpdateDeployment {
                        max_unavailable: int(0),
                        max_surge: string("25%"),
                    }),
                }),
                revision_history_limit: Some(0),
                progress_deadline_seconds: Some(600),
                ..Default::default()
            }),
            status: Some(apps::DeploymentStatus {
                replicas: Some(2),
                conditions: vec![apps::DeploymentCondition {
                    r#type: s("Available"),
                    status: s("True"),
                    last_update_time: Some(meta::Time {
                        seconds: Some(1_700_000_000),
                        nanos: Some(999_999_999),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        };
        assert_eq!(
            object("apps/v1", "Deployment", &deployment),
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "prod", "generation": 4},
                "spec": {
                    "replicas": 2,
                    "selector": {
                        "matchLabels": {"app": "web"},
                        "matchExpressions": [{"key": "tier", "operator": "In",
                                              "values": ["frontend", "edge"]}]
                    },
                    "template": pod_template_json(),
                    "strategy": {"type": "RollingUpdate",
                                 "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}},
                    "revisionHistoryLimit": 0,
                    "progressDeadlineSeconds": 600
                },
                "status": {
                    "replicas": 2,
                    "conditions": [{"type": "Available", "status": "True",
                                    "lastUpdateTime": "2023-11-14T22:13:20Z"}]
                }
            })
        );
    }

    #[test]
    fn service_target_ports() {
        let service = core::Service {
            metadata: name("web"),
            spec: Some(core::ServiceSpec {
                ports: vec![
                    core::ServicePort {
                        name: s("http"),
                        protocol: s("TCP"),
                        port: Some(80),
                        target_port: int(8080),
                        ..Default::default()
                    },
                    core::ServicePort {
                        name: s("https"),
                        protocol: s("TCP"),
                        port: Some(443),
                        target_port: string("https"),
                        ..Default::default()
                    },
                    // An IntOrString message without fields is Go's zero value: int 0.
                    core::ServicePort {
                        name: s("zero"),
                        port: Some(1),
                        target_port: Some(IntOrString::default()),
                        ..Default::default()
                    },
                ],
                selector: strings(&[("app", "web")]),
                r#type: s("ClusterIP"),
                cluster_ips: vec!["10.0.0.10".into(), "fd00::10".into()],
                ip_families: vec!["IPv4".into(), "IPv6".into()],
                ip_family_policy: s("PreferDualStack"),
                ..Default::default()
            }),
            status: None,
        };
        assert_eq!(
            object("v1", "Service", &service),
            json!({
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {
                    "ports": [
                        {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                        {"name": "https", "protocol": "TCP", "port": 443, "targetPort": "https"},
                        {"name": "zero", "port": 1, "targetPort": 0}
                    ],
                    "selector": {"app": "web"}, "type": "ClusterIP",
                    "clusterIPs": ["10.0.0.10", "fd00::10"], "ipFamilies": ["IPv4", "IPv6"],
                    "ipFamilyPolicy": "PreferDualStack"
                }
            })
        );
    }

    #[test]
    fn pod_with_timestamps_and_managed_fields() {
        let pod = core::Pod {
            metadata: Some(meta::ObjectMeta {
                name: s("p"),
                namespace: s("default"),
                uid: s("1f0e5a52-0000-4000-8000-000000000001"),
                resource_version: s("42"),
                creation_timestamp: Some(meta::Time {
                    seconds: Some(1_700_000_000),
                    nanos: Some(0),
                }),
                deletion_timestamp: Some(meta::Time {
                    seconds: Some(1_700_000_030),
                    nanos: None,
                }),
                deletion_grace_period_seconds: Some(30),
                owner_references: vec![meta::OwnerReference {
                    api_version: s("apps/v1"),
                    kind: s("ReplicaSet"),
                    name: s("web-5d4f"),
                    uid: s("u1"),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }],
                finalizers: vec!["example.com/guard".into()],
                managed_fields: vec![meta::ManagedFieldsEntry {
                    manager: s("kubectl-create"),
                    operation: s("Update"),
                    api_version: s("v1"),
                    time: Some(meta::Time {
                        seconds: Some(1_700_000_000),
                        nanos: None,
                    }),
                    fields_type: s("FieldsV1"),
                    fields_v1: Some(meta::FieldsV1 {
                        raw: Some(
                            br#"{"f:spec":{"f:containers":{"k:{\"name\":\"c\"}":{".":{}}}}}"#
                                .to_vec(),
                        ),
                    }),
                    subresource: None,
                }],
                ..Default::default()
            }),
            spec: Some(core::PodSpec {
                containers: vec![core::Container {
                    name: s("c"),
                    image: s("busybox"),
                    ..Default::default()
                }],
                node_name: s("node-1"),
                ..Default::default()
            }),
            status: Some(core::PodStatus {
                phase: s("Running"),
                start_time: Some(meta::Time {
                    seconds: Some(1_700_000_001),
                    nanos: Some(5),
                }),
                pod_ips: vec![core::PodIp { ip: s("10.1.0.5") }],
                ..Default::default()
            }),
        };
        assert_eq!(
            object("v1", "Pod", &pod),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": "p", "namespace": "default",
                    "uid": "1f0e5a52-0000-4000-8000-000000000001", "resourceVersion": "42",
                    "creationTimestamp": "2023-11-14T22:13:20Z",
                    "deletionTimestamp": "2023-11-14T22:13:50Z",
                    "deletionGracePeriodSeconds": 30,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                         "name": "web-5d4f", "uid": "u1", "controller": true,
                                         "blockOwnerDeletion": true}],
                    "finalizers": ["example.com/guard"],
                    "managedFields": [{
                        "manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
                        "time": "2023-11-14T22:13:20Z", "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}}}}}
                    }]
                },
                "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": "node-1"},
                "status": {"phase": "Running", "startTime": "2023-11-14T22:13:21Z",
                           "podIPs": [{"ip": "10.1.0.5"}]}
            })
        );
    }

    #[test]
    fn lease_and_event_micro_times() {
        let lease = coordination::Lease {
            metadata: name("leader"),
            spec: Some(coordination::LeaseSpec {
                holder_identity: s("node-1"),
                lease_duration_seconds: Some(15),
                acquire_time: Some(meta::MicroTime {
                    seconds: Some(1_700_000_000),
                    nanos: Some(1_234_567),
                }),
                renew_time: Some(meta::MicroTime {
                    seconds: Some(1_700_000_010),
                    nanos: None,
                }),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        assert_eq!(
            object("coordination.k8s.io/v1", "Lease", &lease),
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "leader"},
                "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": 15,
                         "acquireTime": "2023-11-14T22:13:20.001234Z",
                         "renewTime": "2023-11-14T22:13:30.000000Z", "leaseTransitions": 0}
            })
        );
        let event = core::Event {
            metadata: name("e"),
            involved_object: Some(core::ObjectReference {
                kind: s("Pod"),
                name: s("p"),
                ..Default::default()
            }),
            reason: s("Started"),
            count: Some(2),
            event_time: Some(meta::MicroTime {
                seconds: Some(1_700_000_000),
                nanos: Some(999_999_999),
            }),
            first_timestamp: Some(meta::Time::default()),
            ..Default::default()
        };
        assert_eq!(
            object("v1", "Event", &event),
            json!({
                "apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"},
                "involvedObject": {"kind": "Pod", "name": "p"}, "reason": "Started",
                "count": 2, "eventTime": "2023-11-14T22:13:20.999999Z",
                "firstTimestamp": null
            })
        );
    }

    #[test]
    fn delete_options_binding_and_scale() {
        let options = meta::DeleteOptions {
            grace_period_seconds: Some(0),
            preconditions: Some(meta::Preconditions {
                uid: s("u1"),
                resource_version: None,
            }),
            propagation_policy: s("Foreground"),
            dry_run: vec!["All".into()],
            ..Default::default()
        };
        for api_version in ["v1", "apps/v1", "meta.k8s.io/v1"] {
            assert_eq!(
                object(api_version, "DeleteOptions", &options),
                json!({
                    "apiVersion": api_version, "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0, "preconditions": {"uid": "u1"},
                    "propagationPolicy": "Foreground", "dryRun": ["All"]
                })
            );
        }
        let binding = core::Binding {
            metadata: name("p"),
            target: Some(core::ObjectReference {
                kind: s("Node"),
                name: s("node-1"),
                api_version: s("v1"),
                ..Default::default()
            }),
        };
        assert_eq!(
            object("v1", "Binding", &binding),
            json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
                   "target": {"kind": "Node", "name": "node-1", "apiVersion": "v1"}})
        );
        let token_request = authentication::TokenRequest {
            metadata: name("robot"),
            spec: Some(authentication::TokenRequestSpec {
                audiences: vec!["api".into()],
                expiration_seconds: Some(600),
                bound_object_ref: Some(authentication::BoundObjectReference {
                    kind: s("Pod"),
                    api_version: s("v1"),
                    name: s("p"),
                    u_id: s("u1"),
                }),
            }),
            status: None,
        };
        assert_eq!(
            object("authentication.k8s.io/v1", "TokenRequest", &token_request),
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "metadata": {"name": "robot"},
                   "spec": {"audiences": ["api"], "expirationSeconds": 600,
                            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u1"}}})
        );
        let scale = autoscaling::Scale {
            metadata: name("web"),
            spec: Some(autoscaling::ScaleSpec { replicas: Some(5) }),
            status: Some(autoscaling::ScaleStatus {
                replicas: Some(2),
                selector: s("app=web"),
            }),
        };
        assert_eq!(
            object("autoscaling/v1", "Scale", &scale),
            json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "web"},
                   "spec": {"replicas": 5}, "status": {"replicas": 2, "selector": "app=web"}})
        );
    }

    /// Pod { spec { securityContext { supplementalGroups } } } written by hand.
    fn pod_with_groups(groups: impl FnOnce(u32, &mut Vec<u8>)) -> Vec<u8> {
        let mut sc = Vec::new();
        groups(
            tag(
                "io.k8s.api.core.v1.PodSecurityContext",
                "supplementalGroups",
            ),
            &mut sc,
        );
        let mut spec = Vec::new();
        prost::encoding::bytes::encode(
            tag("io.k8s.api.core.v1.PodSpec", "securityContext"),
            &sc,
            &mut spec,
        );
        let mut pod = Vec::new();
        prost::encoding::bytes::encode(tag("io.k8s.api.core.v1.Pod", "spec"), &spec, &mut pod);
        envelope("v1", "Pod", pod)
    }

    #[test]
    fn repeated_numbers_packed_or_not() {
        let values = [1000i64, -1, 1 << 40];
        let expected = json!([1000, -1, 1i64 << 40]);
        let unpacked =
            pod_with_groups(|t, b| prost::encoding::int64::encode_repeated(t, &values, b));
        let packed = pod_with_groups(|t, b| prost::encoding::int64::encode_packed(t, &values, b));
        // Both encodings in one message: the items add up.
        let mixed = pod_with_groups(|t, b| {
            prost::encoding::int64::encode_packed(t, &values[..2], b);
            prost::encoding::int64::encode_repeated(t, &values[2..], b);
        });
        for body in [unpacked, packed, mixed] {
            let pod = decode(&body).unwrap().object;
            assert_eq!(
                pod["spec"]["securityContext"]["supplementalGroups"],
                expected
            );
        }
    }

    #[test]
    fn unknown_fields_are_skipped_and_messages_merge() {
        let meta_tag = tag("io.k8s.api.core.v1.Namespace", "metadata");
        let mut raw = Vec::new();
        let first = meta::ObjectMeta {
            name: s("ns"),
            labels: strings(&[("a", "1")]),
            ..Default::default()
        };
        prost::encoding::message::encode(meta_tag, &first, &mut raw);
        // Unknown tags of every wire type, a group with a nested group among them.
        encode_key(90, WireType::Varint, &mut raw);
        encode_varint(u64::MAX, &mut raw);
        encode_key(91, WireType::ThirtyTwoBit, &mut raw);
        raw.extend_from_slice(&[1, 2, 3, 4]);
        encode_key(92, WireType::SixtyFourBit, &mut raw);
        raw.extend_from_slice(&[0; 8]);
        prost::encoding::bytes::encode(93, &b"ignored".to_vec(), &mut raw);
        encode_key(94, WireType::StartGroup, &mut raw);
        encode_key(1, WireType::StartGroup, &mut raw);
        encode_key(2, WireType::Varint, &mut raw);
        encode_varint(7, &mut raw);
        encode_key(1, WireType::EndGroup, &mut raw);
        encode_key(94, WireType::EndGroup, &mut raw);
        // metadata again: merged into the first, as protobuf merges repeated messages.
        let second = meta::ObjectMeta {
            labels: strings(&[("b", "2")]),
            finalizers: vec!["f".into()],
            ..Default::default()
        };
        prost::encoding::message::encode(meta_tag, &second, &mut raw);
        let third = meta::ObjectMeta {
            finalizers: vec!["g".into()],
            ..Default::default()
        };
        prost::encoding::message::encode(meta_tag, &third, &mut raw);
        assert_eq!(
            decode(&envelope("v1", "Namespace", raw)).unwrap().object,
            json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "ns", "labels": {"a": "1", "b": "2"},
                             "finalizers": ["f", "g"]}
            })
        );
    }

    #[test]
    fn map_entries_without_key_or_value_are_zero() {
        let data = tag("io.k8s.api.core.v1.ConfigMap", "data");
        let limits = tag("io.k8s.api.core.v1.ResourceRequirements", "limits");
        let mut raw = Vec::new();
        // An entry with only a key, and an entry with only a value.
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, &"k".to_string(), &mut entry);
        prost::encoding::bytes::encode(data, &entry, &mut raw);
        let mut entry = Vec::new();
        prost::encoding::string::encode(2, &"v".to_string(), &mut entry);
        prost::encoding::bytes::encode(data, &entry, &mut raw);
        assert_eq!(
            decode(&envelope("v1", "ConfigMap", raw)).unwrap().object["data"],
            json!({"k": "", "": "v"})
        );
        // A Quantity entry without a value is Go's zero Quantity.
        let mut requirements = Vec::new();
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, &"cpu".to_string(), &mut entry);
        prost::encoding::bytes::encode(limits, &entry, &mut requirements);
        let container = [
            pb_field(tag("io.k8s.api.core.v1.Container", "name"), b"c"),
            pb_field(
                tag("io.k8s.api.core.v1.Container", "resources"),
                &requirements,
            ),
        ]
        .concat();
        let spec = pb_field(tag("io.k8s.api.core.v1.PodSpec", "containers"), &container);
        let pod = pb_field(tag("io.k8s.api.core.v1.Pod", "spec"), &spec);
        let pod = decode(&envelope("v1", "Pod", pod)).unwrap().object;
        assert_eq!(
            pod["spec"]["containers"][0],
            json!({"name": "c", "resources": {"limits": {"cpu": "0"}}})
        );
    }

    fn pb_field(tag: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::bytes::encode(tag, &payload.to_vec(), &mut out);
        out
    }

    #[test]
    fn envelope_errors() {
        assert_eq!(decode(b"").unwrap_err(), ProtoError::Empty);
        assert_eq!(decode(b"{}").unwrap_err(), ProtoError::NotProtobuf);
        assert_eq!(decode(b"k8s").unwrap_err(), ProtoError::NotProtobuf);
        assert_eq!(
            decode(b"k8s\x01\x0a\x00").unwrap_err(),
            ProtoError::NotProtobuf
        );
        assert_eq!(decode(&MAGIC).unwrap_err(), ProtoError::EmptyBody);
        let mut body = MAGIC.to_vec();
        Unknown {
            type_meta: Some(TypeMeta {
                api_version: s("v1"),
                kind: None,
            }),
            ..Default::default()
        }
        .encode(&mut body)
        .unwrap();
        assert_eq!(
            decode(&body).unwrap_err(),
            ProtoError::MissingKind {
                api_version: "v1".into()
            }
        );
        let mut body = MAGIC.to_vec();
        Unknown {
            type_meta: Some(TypeMeta {
                api_version: None,
                kind: s("Pod"),
            }),
            ..Default::default()
        }
        .encode(&mut body)
        .unwrap();
        assert!(matches!(
            decode(&body),
            Err(ProtoError::MissingVersion { .. })
        ));
        let mut body = MAGIC.to_vec();
        Unknown {
            type_meta: Some(TypeMeta {
                api_version: s("v1"),
                kind: s("Namespace"),
            }),
            raw: Some(vec![]),
            content_encoding: s("gzip"),
            content_type: None,
        }
        .encode(&mut body)
        .unwrap();
        let err = decode(&body).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported protobuf envelope: contentEncoding is \"gzip\""
        );
    }

    #[test]
    fn truncated_bodies_fail_without_panicking() {
        for name in ["namespace", "configmap", "deployment", "service-nodeport"] {
            let body = fixture(name);
            let raw_len = Unknown::decode(&body[4..]).unwrap().raw.unwrap().len();
            // The raw object ends 4 bytes before the end (contentEncoding, contentType).
            let raw_end = body.len() - 4;
            for cut in 0..body.len() {
                let result = decode(&body[..cut]);
                if cut > raw_end - raw_len && cut < raw_end {
                    let err = result.unwrap_err();
                    assert!(
                        matches!(err, ProtoError::Malformed { .. }),
                        "{name} cut at {cut}: {err}"
                    );
                }
            }
        }
        // A cut inside the object's own message, with the envelope's lengths fixed up.
        let deployment = Unknown::decode(&fixture("deployment")[4..])
            .unwrap()
            .raw
            .unwrap();
        for cut in 1..deployment.len() {
            let _ = decode(&envelope(
                "apps/v1",
                "Deployment",
                deployment[..cut].to_vec(),
            ));
        }
        let err = decode(&envelope(
            "apps/v1",
            "Deployment",
            deployment[..deployment.len() - 1].to_vec(),
        ))
        .unwrap_err();
        assert!(
            err.to_string().starts_with("malformed protobuf at status"),
            "{err}"
        );
    }

    #[test]
    fn corrupted_bodies_never_panic() {
        // xorshift: deterministic mutations of the captured bodies.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let bodies: Vec<Vec<u8>> = ["namespace", "configmap", "deployment", "service-nodeport"]
            .iter()
            .map(|n| fixture(n))
            .collect();
        for round in 0..4000 {
            let mut body = bodies[round % bodies.len()].clone();
            for _ in 0..1 + next() % 4 {
                let i = 4 + (next() as usize) % (body.len() - 4);
                body[i] = next() as u8;
            }
            let _ = decode(&body);
        }
    }

    #[test]
    fn wrong_wire_types_are_errors() {
        // metadata (a message) as a varint.
        let mut raw = Vec::new();
        encode_key(1, WireType::Varint, &mut raw);
        encode_varint(1, &mut raw);
        assert_eq!(
            decode(&envelope("v1", "Namespace", raw)).unwrap_err(),
            ProtoError::WrongWireType {
                path: "metadata".into(),
                expected: "length-delimited",
                found: "varint"
            }
        );
        // A port's containerPort (int32) as a string, deep in a Deployment.
        let port = pb_field(
            tag("io.k8s.api.core.v1.ContainerPort", "containerPort"),
            b"80",
        );
        let container = pb_field(tag("io.k8s.api.core.v1.Container", "ports"), &port);
        let spec = pb_field(tag("io.k8s.api.core.v1.PodSpec", "containers"), &container);
        let template = pb_field(tag("io.k8s.api.core.v1.PodTemplateSpec", "spec"), &spec);
        let dspec = pb_field(
            tag("io.k8s.api.apps.v1.DeploymentSpec", "template"),
            &template,
        );
        let deployment = pb_field(tag("io.k8s.api.apps.v1.Deployment", "spec"), &dspec);
        let err = decode(&envelope("apps/v1", "Deployment", deployment)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "wrong wire type for spec.template.spec.containers[0].ports[0].containerPort: \
             expected varint, found length-delimited"
        );
        // An IntOrString of a type that is neither int nor string.
        let mut ios = Vec::new();
        prost::encoding::int64::encode(1, &2, &mut ios);
        let port = pb_field(tag("io.k8s.api.core.v1.ServicePort", "targetPort"), &ios);
        let spec = pb_field(tag("io.k8s.api.core.v1.ServiceSpec", "ports"), &port);
        let service = pb_field(tag("io.k8s.api.core.v1.Service", "spec"), &spec);
        assert!(matches!(
            decode(&envelope("v1", "Service", service)),
            Err(ProtoError::InvalidValue { path, .. }) if path == "spec.ports[0].targetPort"
        ));
        // A stray end group.
        let mut raw = Vec::new();
        encode_key(5, WireType::EndGroup, &mut raw);
        assert!(matches!(
            decode(&envelope("v1", "Namespace", raw)),
            Err(ProtoError::Malformed { .. })
        ));
    }

    /// A message that contains itself, which no served kind does, to reach the limit.
    static RECURSIVE: &[MessageDef] = &[MessageDef {
        definition: "test.Node",
        special: None,
        fields: &[
            Field {
                tag: 1,
                json: "child",
                kind: Kind::Message("test.Node"),
                label: Label::Single,
            },
            Field {
                tag: 2,
                json: "items",
                kind: Kind::Message("test.Node"),
                label: Label::Repeated,
            },
        ],
    }];

    fn nested(levels: usize, tag: u32) -> Vec<u8> {
        let mut body = Vec::new();
        for _ in 1..levels {
            body = pb_field(tag, &body);
        }
        body
    }

    fn decode_recursive(body: &[u8]) -> Result<Value, ProtoError> {
        let decoder = Decoder { table: RECURSIVE };
        let mut out = Map::new();
        decoder.message(&RECURSIVE[0], body, &Path::root(), 1, &mut out)?;
        Ok(Value::Object(out))
    }

    #[test]
    fn nesting_is_bounded() {
        for tag in [1, 2] {
            assert!(decode_recursive(&nested(MAX_DEPTH, tag)).is_ok());
            assert!(matches!(
                decode_recursive(&nested(MAX_DEPTH + 1, tag)),
                Err(ProtoError::TooDeep { .. })
            ));
            assert!(matches!(
                decode_recursive(&nested(5000, tag)),
                Err(ProtoError::TooDeep { .. })
            ));
        }
        // Deeply nested groups in an unknown field.
        let mut raw = Vec::new();
        for _ in 0..10_000 {
            encode_key(50, WireType::StartGroup, &mut raw);
        }
        for _ in 0..10_000 {
            encode_key(50, WireType::EndGroup, &mut raw);
        }
        assert!(matches!(
            decode(&envelope("v1", "Namespace", raw)),
            Err(ProtoError::TooDeep { .. })
        ));
        // Deeply nested JSON in FieldsV1.
        let json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let entry = pb_field(
            tag(
                "io.k8s.apimachinery.pkg.apis.meta.v1.ManagedFieldsEntry",
                "fieldsV1",
            ),
            &pb_field(1, json.as_bytes()),
        );
        let metadata = pb_field(
            tag(
                "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
                "managedFields",
            ),
            &entry,
        );
        let raw = pb_field(1, &metadata);
        assert!(matches!(
            decode(&envelope("v1", "ConfigMap", raw)),
            Err(ProtoError::InvalidValue { .. })
        ));
    }

    #[test]
    fn times() {
        let t = |s: i64, n: i32, micro: bool| time(s, n, micro, &Path::root());
        assert_eq!(t(0, 0, false).unwrap(), json!("1970-01-01T00:00:00Z"));
        assert_eq!(t(0, 0, true).unwrap(), json!("1970-01-01T00:00:00.000000Z"));
        assert_eq!(
            t(1, -1, true).unwrap(),
            json!("1970-01-01T00:00:00.999999Z")
        );
        assert_eq!(
            t(0, 1_500_000_000, true).unwrap(),
            json!("1970-01-01T00:00:01.500000Z")
        );
        assert_eq!(t(-62_135_596_800, 0, false).unwrap(), Value::Null);
        assert_eq!(
            t(253_402_300_799, 0, false).unwrap(),
            json!("9999-12-31T23:59:59Z")
        );
        assert!(t(253_402_300_800, 0, false).is_err());
        assert!(t(i64::MAX, i32::MAX, false).is_err());
        assert!(t(i64::MIN, 0, true).is_err());
    }

    #[test]
    fn go_durations() {
        for (nanos, text) in [
            (0, "0s"),
            (1, "1ns"),
            (999, "999ns"),
            (1_500, "1.5µs"),
            (1_500_000, "1.5ms"),
            (1_000_000_000, "1s"),
            (90_000_000_000, "1m30s"),
            (3_723_500_000_000, "1h2m3.5s"),
            (7_200_000_000_000, "2h0m0s"),
            (-1_500_000_000, "-1.5s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
        ] {
            assert_eq!(go_duration(nanos), text);
        }
        let mut body = Vec::new();
        prost::encoding::int64::encode(1, &300_000_000_000, &mut body);
        assert_eq!(
            special_value(Special::Duration, &body, &Path::root(), 1).unwrap(),
            json!("5m0s")
        );
    }

    #[test]
    fn table_is_consistent() {
        for pair in PROTO_MESSAGES.windows(2) {
            assert!(pair[0].definition < pair[1].definition);
        }
        for def in PROTO_MESSAGES {
            assert_eq!(
                def.special.is_some(),
                def.fields.is_empty(),
                "{}",
                def.definition
            );
            for pair in def.fields.windows(2) {
                assert!(pair[0].tag < pair[1].tag, "{}", def.definition);
            }
            for field in def.fields {
                if let Kind::Message(target) = field.kind {
                    assert!(message(target).is_some(), "{} -> {target}", def.definition);
                }
                assert_eq!(field.label == Label::Inline, field.json.is_empty());
            }
        }
        // Canopy's own kinds, like custom resources upstream, have no protobuf encoding.
        for r in BUILTIN.iter().filter(|r| r.group != "canopy.io") {
            assert!(message(r.definition).is_some(), "{}", r.definition);
            assert_eq!(
                root_definition(&r.api_version(), r.kind),
                Some(r.definition)
            );
        }
        for extra in [
            "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
            "io.k8s.api.autoscaling.v1.Scale",
            "io.k8s.api.core.v1.Binding",
            "io.k8s.api.authentication.v1.TokenRequest",
        ] {
            assert!(message(extra).is_some());
        }
    }
}
