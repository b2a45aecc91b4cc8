//! Label and field selectors with upstream's grammar, validation, matching and error
//! messages (`k8s.io/apimachinery/pkg/labels`, `pkg/fields`, and
//! `metav1.LabelSelectorAsSelector`).

use std::fmt;

use serde_json::Value;

/// How a label requirement relates a key to its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    /// `key in (a,b)`: the label exists and has one of the values.
    In,
    /// `key notin (a,b)`: the label is absent or has none of the values.
    NotIn,
    /// `key=value`.
    Equals,
    /// `key==value` (same meaning as `=`, printed as written).
    DoubleEquals,
    /// `key!=value`: the label is absent or has another value.
    NotEquals,
    /// `key`: the label exists.
    Exists,
    /// `!key`: the label does not exist.
    DoesNotExist,
    /// `key>N`: the label is an integer greater than N.
    GreaterThan,
    /// `key<N`: the label is an integer less than N.
    LessThan,
}

/// One requirement of a label selector (all of them must hold).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    operator: Operator,
    values: Vec<String>,
}

impl Requirement {
    /// Builds a requirement, validating it as upstream's `labels.NewRequirement` does.
    pub fn new(key: &str, operator: Operator, values: Vec<String>) -> Result<Self, String> {
        let mut errors: Vec<String> = Vec::new();
        if let Err(e) = validate_label_key(key, "key") {
            errors.push(e);
        }
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => errors.push(field_invalid(
                "values",
                &go_string_slice(&values),
                "for 'in', 'notin' operators, values set can't be empty",
            )),
            Operator::Equals | Operator::DoubleEquals | Operator::NotEquals
                if values.len() != 1 =>
            {
                errors.push(field_invalid(
                    "values",
                    &go_string_slice(&values),
                    "exact-match compatibility requires one single value",
                ))
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                errors.push(field_invalid(
                    "values",
                    &go_string_slice(&values),
                    "values set must be empty for exists and does not exist",
                ))
            }
            Operator::GreaterThan | Operator::LessThan => {
                if values.len() != 1 {
                    errors.push(field_invalid(
                        "values",
                        &go_string_slice(&values),
                        "for 'Gt', 'Lt' operators, exactly one value is required",
                    ));
                }
                for (i, v) in values.iter().enumerate() {
                    if v.parse::<i64>().is_err() {
                        errors.push(field_invalid(
                            &format!("values[{i}]"),
                            &go_quote(v),
                            "for 'Gt', 'Lt' operators, the value must be an integer",
                        ));
                    }
                }
            }
            _ => {}
        }
        for (i, v) in values.iter().enumerate() {
            let problems = label_value_errors(v);
            if !problems.is_empty() {
                errors.push(field_invalid(
                    &format!("values[{i}][{key}]"),
                    &go_quote(v),
                    &problems.join("; "),
                ));
            }
        }
        if errors.is_empty() {
            Ok(Requirement {
                key: key.to_string(),
                operator,
                values,
            })
        } else {
            Err(aggregate(errors))
        }
    }

    /// The label key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operator.
    pub fn operator(&self) -> Operator {
        self.operator
    }

    /// The values (empty for `Exists`/`DoesNotExist`).
    pub fn values(&self) -> &[String] {
        &self.values
    }

    fn has_value(&self, value: &str) -> bool {
        self.values.iter().any(|v| v == value)
    }

    /// Whether the labels satisfy the requirement; `label` looks up a label's value.
    pub fn matches<'a, F: Fn(&str) -> Option<&'a str>>(&self, label: F) -> bool {
        match self.operator {
            Operator::In | Operator::Equals | Operator::DoubleEquals => {
                label(&self.key).is_some_and(|v| self.has_value(v))
            }
            Operator::NotIn | Operator::NotEquals => {
                label(&self.key).is_none_or(|v| !self.has_value(v))
            }
            Operator::Exists => label(&self.key).is_some(),
            Operator::DoesNotExist => label(&self.key).is_none(),
            Operator::GreaterThan | Operator::LessThan => {
                let Some(actual) = label(&self.key).and_then(|v| v.parse::<i64>().ok()) else {
                    return false;
                };
                let [wanted] = self.values.as_slice() else {
                    return false;
                };
                let Ok(wanted) = wanted.parse::<i64>() else {
                    return false;
                };
                if self.operator == Operator::GreaterThan {
                    actual > wanted
                } else {
                    actual < wanted
                }
            }
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.operator == Operator::DoesNotExist {
            f.write_str("!")?;
        }
        f.write_str(&self.key)?;
        let op = match self.operator {
            Operator::Exists | Operator::DoesNotExist => return Ok(()),
            Operator::Equals => "=",
            Operator::DoubleEquals => "==",
            Operator::NotEquals => "!=",
            Operator::In => " in (",
            Operator::NotIn => " notin (",
            Operator::GreaterThan => ">",
            Operator::LessThan => "<",
        };
        f.write_str(op)?;
        // Upstream prints set values sorted without changing the requirement itself.
        let mut values: Vec<&str> = self.values.iter().map(String::as_str).collect();
        values.sort_unstable();
        f.write_str(&values.join(","))?;
        if matches!(self.operator, Operator::In | Operator::NotIn) {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A label selector: the AND of its requirements. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses the query-string syntax (`a=b,c in (d,e),!f`), as upstream's `labels.Parse`.
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut parser = Parser {
            items: lex_all(text),
            position: 0,
        };
        let mut requirements = parser.parse()?;
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(LabelSelector { requirements })
    }

    /// Converts a `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`), as
    /// upstream's `LabelSelectorAsSelector`. `null` and `{}` give the empty selector.
    pub fn from_json(selector: &Value) -> Result<LabelSelector, String> {
        let obj = match selector {
            Value::Null => return Ok(LabelSelector::default()),
            Value::Object(obj) => obj,
            other => {
                return Err(format!(
                    "a label selector must be an object, not {}",
                    json_kind(other)
                ));
            }
        };
        let mut requirements = Vec::new();
        match obj.get("matchLabels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(labels)) => {
                let mut pairs: Vec<(&String, &Value)> = labels.iter().collect();
                pairs.sort_by(|a, b| a.0.cmp(b.0));
                for (key, value) in pairs {
                    let value = match value {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => {
                            return Err(format!(
                                "matchLabels[{key}] must be a string, not {}",
                                json_kind(other)
                            ));
                        }
                    };
                    requirements.push(Requirement::new(key, Operator::Equals, vec![value])?);
                }
            }
            Some(other) => {
                return Err(format!(
                    "matchLabels must be an object, not {}",
                    json_kind(other)
                ));
            }
        }
        match obj.get("matchExpressions") {
            None | Some(Value::Null) => {}
            Some(Value::Array(exprs)) => {
                for (i, expr) in exprs.iter().enumerate() {
                    requirements.push(expression_requirement(i, expr)?);
                }
            }
            Some(other) => {
                return Err(format!(
                    "matchExpressions must be an array, not {}",
                    json_kind(other)
                ));
            }
        }
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(LabelSelector { requirements })
    }

    /// Whether the labels match every requirement; `label` looks up a label's value.
    pub fn matches<'a, F: Fn(&str) -> Option<&'a str>>(&self, label: F) -> bool {
        self.requirements.iter().all(|r| r.matches(&label))
    }

    /// Whether an object's `metadata.labels` match.
    pub fn matches_object(&self, obj: &Value) -> bool {
        let labels = obj
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.matches(|key| labels?.get(key)?.as_str())
    }

    /// Whether the selector has no requirements (and so matches everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The selector `key=value`, for keys and values the server itself chose (unchecked).
    pub fn exactly(key: &str, value: &str) -> LabelSelector {
        LabelSelector {
            requirements: vec![Requirement {
                key: key.to_string(),
                operator: Operator::Equals,
                values: vec![value.to_string()],
            }],
        }
    }

    /// Both selectors.
    pub fn and(mut self, other: &LabelSelector) -> LabelSelector {
        self.requirements.extend(other.requirements.iter().cloned());
        self.requirements.sort_by(|a, b| a.key.cmp(&b.key));
        self
    }

    /// The requirements, sorted by key.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

fn expression_requirement(index: usize, expr: &Value) -> Result<Requirement, String> {
    let Some(expr) = expr.as_object() else {
        return Err(format!(
            "matchExpressions[{index}] must be an object, not {}",
            json_kind(expr)
        ));
    };
    let string_field = |name: &str| -> Result<String, String> {
        match expr.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "matchExpressions[{index}].{name} must be a string, not {}",
                json_kind(other)
            )),
        }
    };
    let key = string_field("key")?;
    let operator = string_field("operator")?;
    let values = match expr.get("values") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(j, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "matchExpressions[{index}].values[{j}] must be a string, not {}",
                    json_kind(other)
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(format!(
                "matchExpressions[{index}].values must be an array, not {}",
                json_kind(other)
            ));
        }
    };
    let operator = match operator.as_str() {
        "In" => Operator::In,
        "NotIn" => Operator::NotIn,
        "Exists" => Operator::Exists,
        "DoesNotExist" => Operator::DoesNotExist,
        other => {
            return Err(format!(
                "{} is not a valid label selector operator",
                go_quote(other)
            ));
        }
    };
    Requirement::new(&key, operator, values)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ---- Lexer and parser, mirroring upstream's so that errors read the same. ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Error,
    EndOfString,
    ClosedPar,
    Comma,
    DoesNotExist,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier,
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

fn keyword(s: &str) -> Option<Token> {
    Some(match s {
        ")" => Token::ClosedPar,
        "," => Token::Comma,
        "!" => Token::DoesNotExist,
        "==" => Token::DoubleEquals,
        "=" => Token::Equals,
        ">" => Token::GreaterThan,
        "in" => Token::In,
        "<" => Token::LessThan,
        "!=" => Token::NotEquals,
        "notin" => Token::NotIn,
        "(" => Token::OpenPar,
        _ => return None,
    })
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_special(b: u8) -> bool {
    matches!(b, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// Splits at ASCII bytes only, so every slice taken falls on a UTF-8 boundary.
fn lex_all(text: &str) -> Vec<(Token, String)> {
    let bytes = text.as_bytes();
    let mut pos = 0;
    let mut items = Vec::new();
    loop {
        while bytes.get(pos).is_some_and(|b| is_whitespace(*b)) {
            pos += 1;
        }
        let Some(&first) = bytes.get(pos) else {
            items.push((Token::EndOfString, String::new()));
            return items;
        };
        let start = pos;
        if is_special(first) {
            let mut last: Option<(Token, usize)> = None;
            while let Some(&b) = bytes.get(pos) {
                if !is_special(b) {
                    break;
                }
                let candidate = text.get(start..pos + 1).unwrap_or("");
                if let Some(tok) = keyword(candidate) {
                    last = Some((tok, pos + 1));
                } else if last.is_some() {
                    break;
                }
                pos += 1;
            }
            match last {
                Some((tok, end)) => {
                    items.push((tok, text.get(start..end).unwrap_or("").to_string()));
                    pos = end;
                }
                None => {
                    // Unreachable with today's operator set (every special byte is a token
                    // by itself), kept so the parser reports what upstream would.
                    let found = text.get(start..pos).unwrap_or("");
                    items.push((
                        Token::Error,
                        format!("error expected: keyword found '{found}'"),
                    ));
                }
            }
        } else {
            while bytes
                .get(pos)
                .is_some_and(|b| !is_special(*b) && !is_whitespace(*b))
            {
                pos += 1;
            }
            let word = text.get(start..pos).unwrap_or("");
            let tok = keyword(word).unwrap_or(Token::Identifier);
            items.push((tok, word.to_string()));
        }
    }
}

/// Whether `in` and `notin` are read as operators or as plain words (keys, values).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    KeyAndOperator,
    Values,
}

struct Parser {
    items: Vec<(Token, String)>,
    position: usize,
}

impl Parser {
    fn peek_at(&self, position: usize, context: Context) -> (Token, String) {
        let (tok, lit) = self
            .items
            .get(position)
            .cloned()
            .unwrap_or((Token::EndOfString, String::new()));
        let tok = match tok {
            Token::In | Token::NotIn if context == Context::Values => Token::Identifier,
            other => other,
        };
        (tok, lit)
    }

    fn lookahead(&self, context: Context) -> (Token, String) {
        self.peek_at(self.position, context)
    }

    fn consume(&mut self, context: Context) -> (Token, String) {
        let item = self.peek_at(self.position, context);
        self.position += 1;
        item
    }

    fn parse(&mut self) -> Result<Vec<Requirement>, String> {
        let mut requirements = Vec::new();
        loop {
            let (tok, lit) = self.lookahead(Context::Values);
            match tok {
                Token::Identifier | Token::DoesNotExist => {
                    let r = self
                        .parse_requirement()
                        .map_err(|e| format!("unable to parse requirement: {e}"))?;
                    requirements.push(r);
                    let (t, l) = self.consume(Context::Values);
                    match t {
                        Token::EndOfString => return Ok(requirements),
                        Token::Comma => {
                            let (t2, l2) = self.lookahead(Context::Values);
                            if t2 != Token::Identifier && t2 != Token::DoesNotExist {
                                return Err(format!(
                                    "found '{l2}', expected: identifier after ','"
                                ));
                            }
                        }
                        _ => {
                            return Err(format!("found '{l}', expected: ',' or 'end of string'"));
                        }
                    }
                }
                Token::EndOfString => return Ok(requirements),
                _ => {
                    return Err(format!(
                        "found '{lit}', expected: !, identifier, or 'end of string'"
                    ));
                }
            }
        }
    }

    fn parse_requirement(&mut self) -> Result<Requirement, String> {
        let (key, inferred) = self.parse_key_and_infer_operator()?;
        if let Some(op) = inferred {
            return Requirement::new(&key, op, Vec::new());
        }
        let operator = self.parse_operator()?;
        let values = match operator {
            Operator::In | Operator::NotIn => self.parse_values()?,
            _ => self.parse_exact_value()?,
        };
        Requirement::new(&key, operator, values)
    }

    fn parse_key_and_infer_operator(&mut self) -> Result<(String, Option<Operator>), String> {
        let mut operator = None;
        let (mut tok, mut literal) = self.consume(Context::Values);
        if tok == Token::DoesNotExist {
            operator = Some(Operator::DoesNotExist);
            (tok, literal) = self.consume(Context::Values);
        }
        if tok != Token::Identifier {
            return Err(format!("found '{literal}', expected: identifier"));
        }
        // Upstream validates the key here with a nil field path, hence "<nil>".
        validate_label_key(&literal, "<nil>")?;
        let (next, _) = self.lookahead(Context::Values);
        if (next == Token::EndOfString || next == Token::Comma) && operator.is_none() {
            operator = Some(Operator::Exists);
        }
        Ok((literal, operator))
    }

    fn parse_operator(&mut self) -> Result<Operator, String> {
        let (tok, lit) = self.consume(Context::KeyAndOperator);
        Ok(match tok {
            Token::In => Operator::In,
            Token::Equals => Operator::Equals,
            Token::DoubleEquals => Operator::DoubleEquals,
            Token::GreaterThan => Operator::GreaterThan,
            Token::LessThan => Operator::LessThan,
            Token::NotIn => Operator::NotIn,
            Token::NotEquals => Operator::NotEquals,
            _ => {
                return Err(format!(
                    "found '{lit}', expected: in, notin, =, ==, !=, gt, lt"
                ));
            }
        })
    }

    fn parse_values(&mut self) -> Result<Vec<String>, String> {
        let (tok, lit) = self.consume(Context::Values);
        if tok != Token::OpenPar {
            return Err(format!("found '{lit}' expected: '('"));
        }
        let (tok, lit) = self.lookahead(Context::Values);
        match tok {
            Token::Identifier | Token::Comma => {
                let values = self.parse_identifiers_list()?;
                let (closing, _) = self.consume(Context::Values);
                if closing != Token::ClosedPar {
                    return Err(format!("found '{lit}', expected: ')'"));
                }
                Ok(values)
            }
            Token::ClosedPar => {
                self.consume(Context::Values);
                Ok(vec![String::new()])
            }
            _ => Err(format!("found '{lit}', expected: ',', ')' or identifier")),
        }
    }

    /// A comma-separated list of possibly empty values; the result is sorted and
    /// deduplicated, as upstream collects it in a string set.
    fn parse_identifiers_list(&mut self) -> Result<Vec<String>, String> {
        let mut set = std::collections::BTreeSet::new();
        loop {
            let (tok, lit) = self.consume(Context::Values);
            match tok {
                Token::Identifier => {
                    set.insert(lit);
                    let (tok2, lit2) = self.lookahead(Context::Values);
                    match tok2 {
                        Token::Comma => continue,
                        Token::ClosedPar => return Ok(set.into_iter().collect()),
                        _ => return Err(format!("found '{lit2}', expected: ',' or ')'")),
                    }
                }
                Token::Comma => {
                    if set.is_empty() {
                        set.insert(String::new());
                    }
                    let (tok2, _) = self.lookahead(Context::Values);
                    if tok2 == Token::ClosedPar {
                        set.insert(String::new());
                        return Ok(set.into_iter().collect());
                    }
                    if tok2 == Token::Comma {
                        self.consume(Context::Values);
                        set.insert(String::new());
                    }
                }
                _ => return Err(format!("found '{lit}', expected: ',', or identifier")),
            }
        }
    }

    fn parse_exact_value(&mut self) -> Result<Vec<String>, String> {
        let (tok, _) = self.lookahead(Context::Values);
        if tok == Token::EndOfString || tok == Token::Comma {
            return Ok(vec![String::new()]);
        }
        let (tok, lit) = self.consume(Context::Values);
        if tok == Token::Identifier {
            Ok(vec![lit])
        } else {
            Err(format!("found '{lit}', expected: identifier"))
        }
    }
}

// ---- Validation, with upstream's messages (`k8s.io/apimachinery/pkg/util/validation`). ----

const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_ERR: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_ERR: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_ERR: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    if examples.is_empty() {
        return format!("{msg} (regex used for validation is '{fmt}')");
    }
    let mut out = format!("{msg} (e.g. ");
    for (i, e) in examples.iter().enumerate() {
        if i > 0 {
            out.push_str(" or ");
        }
        out.push_str(&format!("'{e}', "));
    }
    out.push_str(&format!("regex used for validation is '{fmt}')"));
    out
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, anchored.
fn is_qualified_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`, anchored.
fn is_dns1123_subdomain_syntax(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|label| {
            let bytes = label.as_bytes();
            match (bytes.first(), bytes.last()) {
                (Some(f), Some(l)) => {
                    (f.is_ascii_lowercase() || f.is_ascii_digit())
                        && (l.is_ascii_lowercase() || l.is_ascii_digit())
                        && bytes
                            .iter()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                }
                _ => false,
            }
        })
}

fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > 253 {
        errs.push("must be no more than 253 characters".to_string());
    }
    if !is_dns1123_subdomain_syntax(value) {
        errs.push(regex_error(
            DNS1123_SUBDOMAIN_ERR,
            DNS1123_SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    errs
}

/// Upstream's `validation.IsQualifiedName`.
fn qualified_name_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_string());
            } else {
                errs.extend(
                    dns1123_subdomain_errors(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            *name
        }
        _ => {
            errs.push(format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(
                    QUALIFIED_NAME_ERR,
                    QUALIFIED_NAME_FMT,
                    &["MyName", "my.name", "123-abc"]
                )
            ));
            return errs;
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_string());
    } else if name.len() > 63 {
        errs.push("name part must be no more than 63 characters".to_string());
    }
    if !is_qualified_name_part(name) {
        errs.push(format!(
            "name part {}",
            regex_error(
                QUALIFIED_NAME_ERR,
                QUALIFIED_NAME_FMT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    errs
}

/// Upstream's `validation.IsValidLabelValue`.
fn label_value_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > 63 {
        errs.push("must be no more than 63 characters".to_string());
    }
    if !value.is_empty() && !is_qualified_name_part(value) {
        errs.push(regex_error(
            LABEL_VALUE_ERR,
            LABEL_VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    errs
}

fn validate_label_key(key: &str, path: &str) -> Result<(), String> {
    let errs = qualified_name_errors(key);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(field_invalid(path, &go_quote(key), &errs.join("; ")))
    }
}

/// A `field.Invalid` error as upstream prints it; `shown` is the value already formatted.
fn field_invalid(path: &str, shown: &str, detail: &str) -> String {
    format!("{path}: Invalid value: {shown}: {detail}")
}

/// Upstream's `utilerrors.NewAggregate(...).Error()`: one message alone, several
/// deduplicated in brackets.
fn aggregate(errors: Vec<String>) -> String {
    let mut unique: Vec<String> = Vec::new();
    for e in errors {
        if !unique.contains(&e) {
            unique.push(e);
        }
    }
    match unique.as_slice() {
        [one] => one.clone(),
        _ => format!("[{}]", unique.join(", ")),
    }
}

/// Go's `%#v` of a `[]string`.
fn go_string_slice(values: &[String]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| go_quote(v)).collect();
    format!("[]string{{{}}}", quoted.join(", "))
}

/// Go's `strconv.Quote`, which error messages use to show values.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => {
                if (c as u32) <= 0xffff {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---- Field selectors (`k8s.io/apimachinery/pkg/fields`). ----

#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    value: String,
    negated: bool,
}

/// A field selector: `a=b`, `a==b` and `a!=b` terms, all of which must hold. The empty
/// selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

impl FieldSelector {
    /// Parses a field selector as upstream's `fields.ParseSelector`, including the
    /// backslash escapes `\,`, `\=` and `\\` in values.
    pub fn parse(text: &str) -> Result<FieldSelector, String> {
        let mut parts = split_terms(text);
        parts.sort_unstable();
        let mut terms = Vec::new();
        for part in parts {
            if part.is_empty() {
                continue;
            }
            let Some((field, op, rhs)) = split_term(part) else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                ));
            };
            let value = unescape_value(rhs)?;
            // Upstream's Transform drops a term whose field and value are both empty.
            if field.is_empty() && value.is_empty() {
                continue;
            }
            terms.push(FieldTerm {
                field: field.to_string(),
                value,
                negated: op == "!=",
            });
        }
        Ok(FieldSelector { terms })
    }

    /// Whether the fields match every term; `value` looks up a field's value. A field that
    /// is absent counts as the empty string, as in upstream's `fields.Set`.
    pub fn matches(&self, value: impl Fn(&str) -> Option<String>) -> bool {
        self.terms.iter().all(|t| {
            let actual = value(&t.field).unwrap_or_default();
            (actual == t.value) != t.negated
        })
    }

    /// The fields the selector looks at, in order, possibly repeated.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|t| t.field.as_str())
    }

    /// The value an `=`/`==` term requires of this field (upstream's `RequiresExactMatch`).
    pub fn exact(&self, field: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|t| !t.negated && t.field == field)
            .map(|t| t.value.as_str())
    }

    /// Whether the selector has no terms (and so matches everything).
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The selector `field=value`.
    pub fn exactly(field: &str, value: &str) -> FieldSelector {
        FieldSelector {
            terms: vec![FieldTerm {
                field: field.to_string(),
                value: value.to_string(),
                negated: false,
            }],
        }
    }

    /// Both selectors.
    pub fn and(mut self, other: &FieldSelector) -> FieldSelector {
        self.terms.extend(other.terms.iter().cloned());
        self
    }
}

impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let op = if t.negated { "!=" } else { "=" };
            write!(f, "{}{op}{}", t.field, escape_value(&t.value))?;
        }
        Ok(())
    }
}

/// Upstream's `fields.EscapeValue`.
fn escape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ',' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Splits at commas that are not escaped; escapes stay in the terms.
fn split_terms(text: &str) -> Vec<&str> {
    if text.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::new();
    let mut start = 0;
    let mut in_slash = false;
    for (i, c) in text.char_indices() {
        if in_slash {
            in_slash = false;
        } else if c == '\\' {
            in_slash = true;
        } else if c == ',' {
            terms.push(text.get(start..i).unwrap_or(""));
            start = i + 1;
        }
    }
    terms.push(text.get(start..).unwrap_or(""));
    terms
}

/// Splits at the first operator; `==` is tried before `=` so it is not left in the value.
fn split_term(term: &str) -> Option<(&str, &'static str, &str)> {
    for (i, _) in term.char_indices() {
        let rest = term.get(i..)?;
        for op in ["!=", "==", "="] {
            if let Some(rhs) = rest.strip_prefix(op) {
                return Some((term.get(..i)?, op, rhs));
            }
        }
    }
    None
}

fn unescape_value(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut in_slash = false;
    for c in s.chars() {
        if in_slash {
            if matches!(c, '\\' | ',' | '=') {
                out.push(c);
                in_slash = false;
                continue;
            }
            return Err(format!(
                "invalid field selector: invalid escape sequence: \\{c}"
            ));
        }
        match c {
            '\\' => in_slash = true,
            // Go prints the rune with %v, i.e. as its code point number.
            ',' | '=' => {
                return Err(format!(
                    "invalid field selector: unescaped character in value: {}",
                    c as u32
                ));
            }
            c => out.push(c),
        }
    }
    if in_slash {
        return Err("invalid field selector: invalid escape sequence: \\".to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v)
    }

    fn round_trip(text: &str) -> String {
        LabelSelector::parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .to_string()
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = LabelSelector::parse("").unwrap();
        assert!(s.is_empty());
        assert!(s.matches(labels(&[])));
        assert!(s.matches(labels(&[("a", "b")])));
        assert_eq!(s.to_string(), "");
        assert!(LabelSelector::parse("   ").unwrap().is_empty());
    }

    #[test]
    fn parses_and_prints_canonically() {
        assert_eq!(round_trip("x=a"), "x=a");
        assert_eq!(round_trip("x==a"), "x==a");
        assert_eq!(round_trip("x!=a"), "x!=a");
        assert_eq!(round_trip("x in (b,a)"), "x in (a,b)");
        assert_eq!(round_trip("x notin (a)"), "x notin (a)");
        assert_eq!(round_trip("x"), "x");
        assert_eq!(round_trip("!x"), "!x");
        assert_eq!(round_trip("x>1"), "x>1");
        assert_eq!(round_trip("x<1"), "x<1");
        // Sorted by key; whitespace is tolerated everywhere.
        assert_eq!(
            round_trip(" z = 1 ,  a in ( x , y ) ,!m "),
            "a in (x,y),!m,z=1"
        );
        assert_eq!(round_trip("x="), "x=");
        assert_eq!(round_trip("x in ()"), "x in ()");
        assert_eq!(
            round_trip("x in (foo,,baz),y,z notin ()"),
            "x in (,baz,foo),y,z notin ()"
        );
        assert_eq!(round_trip("x in (a,a,b)"), "x in (a,b)");
        assert_eq!(round_trip("example.com/app=web"), "example.com/app=web");
    }

    #[test]
    fn in_and_notin_are_words_where_values_go() {
        assert_eq!(round_trip("in in (in)"), "in in (in)");
        assert_eq!(round_trip("notin=in"), "notin=in");
    }

    #[test]
    fn matching_follows_upstream() {
        let app_web = [("app", "web"), ("tier", "front")];
        let none: [(&str, &str); 0] = [];
        let cases: &[(&str, bool, bool)] = &[
            // (selector, matches app_web, matches no labels)
            ("app=web", true, false),
            ("app==web", true, false),
            ("app=db", false, false),
            ("app!=db", true, true),
            ("app!=web", false, true),
            ("app in (web,db)", true, false),
            ("app in (db)", false, false),
            ("app notin (db)", true, true),
            ("app notin (web)", false, true),
            ("app", true, false),
            ("!app", false, true),
            ("app=web,tier=front", true, false),
            ("app=web,tier=back", false, false),
            ("missing=", false, false),
        ];
        for (text, with, without) in cases {
            let s = LabelSelector::parse(text).unwrap();
            assert_eq!(s.matches(labels(&app_web)), *with, "{text} on app_web");
            assert_eq!(s.matches(labels(&none)), *without, "{text} on nothing");
        }
        let empty_value = [("x", "")];
        assert!(
            LabelSelector::parse("x=")
                .unwrap()
                .matches(labels(&empty_value))
        );
        assert!(
            LabelSelector::parse("x in ()")
                .unwrap()
                .matches(labels(&empty_value))
        );
    }

    #[test]
    fn greater_and_less_than() {
        let s = LabelSelector::parse("n>5").unwrap();
        assert!(s.matches(labels(&[("n", "6")])));
        assert!(!s.matches(labels(&[("n", "5")])));
        assert!(!s.matches(labels(&[("n", "x")])));
        assert!(!s.matches(labels(&[])));
        let s = LabelSelector::parse("n<5").unwrap();
        assert!(s.matches(labels(&[("n", "4")])));
        assert!(!s.matches(labels(&[("n", "5")])));
        assert_eq!(
            LabelSelector::parse("n>a").unwrap_err(),
            "unable to parse requirement: values[0]: Invalid value: \"a\": for 'Gt', 'Lt' operators, the value must be an integer"
        );
    }

    #[test]
    fn syntax_errors_read_like_upstream() {
        let cases: &[(&str, &str)] = &[
            (
                "x y",
                "unable to parse requirement: found 'y', expected: in, notin, =, ==, !=, gt, lt",
            ),
            ("x=a,", "found '', expected: identifier after ','"),
            ("x=a b", "found 'b', expected: ',' or 'end of string'"),
            (
                ",x",
                "found ',', expected: !, identifier, or 'end of string'",
            ),
            (
                "=x",
                "found '=', expected: !, identifier, or 'end of string'",
            ),
            (
                "x in",
                "unable to parse requirement: found '' expected: '('",
            ),
            (
                "x in (a",
                "unable to parse requirement: found '', expected: ',' or ')'",
            ),
            (
                "x in (a b)",
                "unable to parse requirement: found 'b', expected: ',' or ')'",
            ),
            (
                "x in (=)",
                "unable to parse requirement: found '=', expected: ',', ')' or identifier",
            ),
            (
                "x in (a,=)",
                "unable to parse requirement: found '=', expected: ',', or identifier",
            ),
            (
                "!",
                "unable to parse requirement: found '', expected: identifier",
            ),
            (
                "x=(",
                "unable to parse requirement: found '(', expected: identifier",
            ),
            ("!x=a", "found '=', expected: ',' or 'end of string'"),
        ];
        for (text, want) in cases {
            assert_eq!(&LabelSelector::parse(text).unwrap_err(), want, "{text}");
        }
    }

    #[test]
    fn key_and_value_validation_messages() {
        assert_eq!(
            LabelSelector::parse("app:monolith").unwrap_err(),
            "unable to parse requirement: <nil>: Invalid value: \"app:monolith\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        );
        assert_eq!(
            LabelSelector::parse("a/b/c ?=? def").unwrap_err(),
            "unable to parse requirement: <nil>: Invalid value: \"a/b/c\": a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        );
        assert_eq!(
            LabelSelector::parse("app.kubernetes_io/name=x").unwrap_err(),
            "unable to parse requirement: <nil>: Invalid value: \"app.kubernetes_io/name\": prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        );
        assert_eq!(
            LabelSelector::parse("/a").unwrap_err(),
            "unable to parse requirement: <nil>: Invalid value: \"/a\": prefix part must be non-empty"
        );
        let long = "a".repeat(64);
        assert_eq!(
            LabelSelector::parse(&long).unwrap_err(),
            format!(
                "unable to parse requirement: <nil>: Invalid value: \"{long}\": name part must be no more than 63 characters"
            )
        );
        assert!(LabelSelector::parse(&"a".repeat(63)).is_ok());
        assert_eq!(
            LabelSelector::parse("a=-b").unwrap_err(),
            "unable to parse requirement: values[0][a]: Invalid value: \"-b\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        );
        let long_value = format!("a={}", "v".repeat(64));
        assert!(LabelSelector::parse(&long_value).unwrap_err().ends_with(
            ": Invalid value: \"vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\": must be no more than 63 characters"
        ));
    }

    #[test]
    fn non_ascii_input_does_not_panic() {
        assert!(LabelSelector::parse("é=ü").is_err());
        assert!(LabelSelector::parse("a in (ü,").is_err());
        assert!(LabelSelector::parse("a=b,ü").is_err());
        assert!(FieldSelector::parse("é=ü,ß!=\\,").is_ok());
    }

    #[test]
    fn from_json_converts_match_labels_and_expressions() {
        let s = LabelSelector::from_json(&json!({
            "matchLabels": {"tier": "front", "app": "web"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "dev"]},
                {"key": "legacy", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "NotIn", "values": ["a"]},
                {"key": "owner", "operator": "Exists"}
            ]
        }))
        .unwrap();
        assert_eq!(
            s.to_string(),
            "app=web,env in (dev,prod),!legacy,owner,tier=front,zone notin (a)"
        );
        assert!(s.matches_object(&json!({"metadata": {"labels": {
            "app": "web", "tier": "front", "env": "prod", "owner": "me"
        }}})));
        assert!(!s.matches_object(&json!({"metadata": {"labels": {
            "app": "web", "tier": "front", "env": "prod", "owner": "me", "legacy": "1"
        }}})));
        assert!(!s.matches_object(&json!({})));
    }

    #[test]
    fn from_json_empty_means_everything() {
        for v in [
            json!(null),
            json!({}),
            json!({"matchLabels": {}, "matchExpressions": []}),
        ] {
            let s = LabelSelector::from_json(&v).unwrap();
            assert!(s.is_empty());
            assert!(s.matches_object(&json!({"metadata": {"labels": {"a": "b"}}})));
        }
    }

    #[test]
    fn from_json_errors() {
        assert_eq!(
            LabelSelector::from_json(
                &json!({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]})
            )
            .unwrap_err(),
            "\"Equals\" is not a valid label selector operator"
        );
        assert_eq!(
            LabelSelector::from_json(
                &json!({"matchExpressions": [{"key": "a", "operator": "In"}]})
            )
            .unwrap_err(),
            "values: Invalid value: []string{}: for 'in', 'notin' operators, values set can't be empty"
        );
        assert_eq!(
            LabelSelector::from_json(
                &json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]})
            )
            .unwrap_err(),
            "values: Invalid value: []string{\"b\"}: values set must be empty for exists and does not exist"
        );
        assert_eq!(
            LabelSelector::from_json(&json!({"matchLabels": {"bad key": "v"}})).unwrap_err(),
            "key: Invalid value: \"bad key\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        );
        let both = LabelSelector::from_json(
            &json!({"matchExpressions": [{"key": "", "operator": "NotIn", "values": []}]}),
        )
        .unwrap_err();
        assert!(both.starts_with(
            "[key: Invalid value: \"\": name part must be non-empty; name part must consist"
        ));
        assert!(both.ends_with(", values: Invalid value: []string{}: for 'in', 'notin' operators, values set can't be empty]"));
        assert!(LabelSelector::from_json(&json!("app=web")).is_err());
        assert!(LabelSelector::from_json(&json!({"matchLabels": []})).is_err());
        assert!(LabelSelector::from_json(&json!({"matchLabels": {"a": 1}})).is_err());
        assert!(LabelSelector::from_json(&json!({"matchExpressions": {}})).is_err());
        assert!(LabelSelector::from_json(&json!({"matchExpressions": [1]})).is_err());
        assert!(
            LabelSelector::from_json(
                &json!({"matchExpressions": [{"key": "a", "operator": "In", "values": [1]}]})
            )
            .is_err()
        );
    }

    #[test]
    fn matches_object_reads_string_labels_only() {
        let s = LabelSelector::parse("a").unwrap();
        assert!(!s.matches_object(&json!({"metadata": {"labels": {"a": 1}}})));
        assert!(!s.matches_object(&json!({"metadata": "x"})));
        assert!(s.matches_object(&json!({"metadata": {"labels": {"a": ""}}})));
    }

    #[test]
    fn go_quote_escapes_like_go() {
        assert_eq!(go_quote("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\x01é\"");
    }

    fn field_lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn field_selector_parses_and_matches() {
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed").unwrap();
        assert!(!s.is_empty());
        assert_eq!(s.to_string(), "spec.nodeName=n1,status.phase!=Failed");
        assert!(s.matches(field_lookup(&[
            ("spec.nodeName", "n1"),
            ("status.phase", "Running")
        ])));
        assert!(!s.matches(field_lookup(&[
            ("spec.nodeName", "n1"),
            ("status.phase", "Failed")
        ])));
        assert!(!s.matches(field_lookup(&[("spec.nodeName", "n2")])));
        assert_eq!(s.exact("spec.nodeName"), Some("n1"));
        assert_eq!(s.exact("status.phase"), None);
        assert_eq!(s.exact("other"), None);
        assert_eq!(
            s.fields().collect::<Vec<_>>(),
            vec!["spec.nodeName", "status.phase"]
        );
    }

    #[test]
    fn field_selector_absent_field_is_empty_string() {
        let s = FieldSelector::parse("spec.nodeName=").unwrap();
        assert!(s.matches(field_lookup(&[])));
        assert_eq!(s.exact("spec.nodeName"), Some(""));
        let s = FieldSelector::parse("spec.nodeName!=").unwrap();
        assert!(!s.matches(field_lookup(&[])));
        assert!(s.matches(field_lookup(&[("spec.nodeName", "x")])));
    }

    #[test]
    fn field_selector_double_equals_and_sorting() {
        let s = FieldSelector::parse("b==2,a=1").unwrap();
        assert_eq!(s.to_string(), "a=1,b=2");
        assert!(s.matches(field_lookup(&[("a", "1"), ("b", "2")])));
    }

    #[test]
    fn field_selector_empty_and_skipped_terms() {
        for text in ["", ",", ",,", "="] {
            let s = FieldSelector::parse(text).unwrap();
            assert!(s.is_empty(), "{text}");
            assert!(s.matches(field_lookup(&[])));
            assert_eq!(s.to_string(), "");
        }
    }

    #[test]
    fn field_selector_escapes() {
        let s = FieldSelector::parse(r"metadata.name=a\,b\=c\\d,x=y").unwrap();
        assert_eq!(s.exact("metadata.name"), Some(r"a,b=c\d"));
        assert_eq!(s.to_string(), r"metadata.name=a\,b\=c\\d,x=y");
        assert!(s.matches(field_lookup(&[("metadata.name", r"a,b=c\d"), ("x", "y")])));
    }

    #[test]
    fn field_selector_errors() {
        assert_eq!(
            FieldSelector::parse("foo").unwrap_err(),
            "invalid selector: 'foo'; can't understand 'foo'"
        );
        assert_eq!(
            FieldSelector::parse("a=b,c").unwrap_err(),
            "invalid selector: 'a=b,c'; can't understand 'c'"
        );
        assert_eq!(
            FieldSelector::parse(r"a=b\x").unwrap_err(),
            r"invalid field selector: invalid escape sequence: \x"
        );
        assert_eq!(
            FieldSelector::parse(r"a=b\").unwrap_err(),
            r"invalid field selector: invalid escape sequence: \"
        );
        assert_eq!(
            FieldSelector::parse("a=b=c").unwrap_err(),
            "invalid field selector: unescaped character in value: 61"
        );
    }

    #[test]
    fn field_selector_operator_split_points() {
        // The first operator wins; `!=` and `==` are checked before `=` at each position.
        let s = FieldSelector::parse("a!=b").unwrap();
        assert_eq!(s.to_string(), "a!=b");
        let s = FieldSelector::parse("a=!b").unwrap();
        assert_eq!(s.exact("a"), Some("!b"));
        let s = FieldSelector::parse("=b").unwrap();
        assert_eq!(s.exact(""), Some("b"));
    }
}
