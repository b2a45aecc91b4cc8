//! Sets of field paths (structured-merge-diff's `fieldpath.Set`) and their FieldsV1 form.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Map, Value};

use super::MAX_DEPTH;
use super::path::PathElement;

/// A set of paths, as a tree: `members` end here, `children` continue. A path can be both a
/// member and have children (FieldsV1 writes that as `".": {}`). Children are never empty.
///
/// Both levels are vectors sorted by element without repeats: the sets of an object are
/// small per level, built in order by the walks, and combined by merging, which sorted
/// vectors do without the node allocations and pointer chasing of B-trees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Set {
    pub(crate) members: Vec<PathElement>,
    pub(crate) children: Vec<(PathElement, Set)>,
}

fn by_element(a: &(PathElement, Set), b: &(PathElement, Set)) -> Ordering {
    a.0.cmp(&b.0)
}

/// How an element orders against the field `name`: fields order by name, before any other
/// kind of element.
fn by_field(pe: &PathElement, name: &str) -> Ordering {
    match pe {
        PathElement::Field(field) => field.as_str().cmp(name),
        _ => Ordering::Greater,
    }
}

/// Keeps the items of `items` that `keep` accepts, given the item of `other` with the same
/// key if there is one. Both are sorted by that key, so one pass over each suffices.
fn retain_matched<A, B>(
    items: &mut Vec<A>,
    other: &[B],
    cmp: impl Fn(&A, &B) -> Ordering,
    mut keep: impl FnMut(&mut A, Option<&B>) -> bool,
) {
    if other.is_empty() {
        items.retain_mut(|a| keep(a, None));
        return;
    }
    let mut j = 0;
    items.retain_mut(|a| {
        while let Some(b) = other.get(j)
            && cmp(a, b) == Ordering::Greater
        {
            j += 1;
        }
        let matched = other.get(j).filter(|b| cmp(a, b) == Ordering::Equal);
        keep(a, matched)
    });
}

/// Merges two sorted vectors into one, combining the items both have.
fn merge_sorted<T>(
    a: Vec<T>,
    b: Vec<T>,
    cmp: impl Fn(&T, &T) -> Ordering,
    mut combine: impl FnMut(T, T) -> T,
) -> Vec<T> {
    if b.is_empty() {
        return a;
    }
    if a.is_empty() {
        return b;
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    loop {
        let order = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => cmp(x, y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => break,
        };
        let next = match order {
            Ordering::Less => a.next(),
            Ordering::Greater => b.next(),
            Ordering::Equal => match (a.next(), b.next()) {
                (Some(x), Some(y)) => Some(combine(x, y)),
                (x, y) => x.or(y),
            },
        };
        out.extend(next);
    }
    out
}

impl Set {
    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty() && self.children.is_empty()
    }

    /// Adds a path. The empty path is the whole object, which nobody owns.
    pub(crate) fn insert(&mut self, path: &[PathElement]) {
        match path {
            [] => {}
            [last] => self.insert_member(last),
            [first, rest @ ..] => {
                let i = match self.children.binary_search_by(|(pe, _)| pe.cmp(first)) {
                    Ok(i) => i,
                    Err(i) => {
                        self.children.insert(i, (first.clone(), Set::default()));
                        i
                    }
                };
                if let Some((_, child)) = self.children.get_mut(i) {
                    child.insert(rest);
                }
            }
        }
    }

    pub(crate) fn insert_member(&mut self, pe: &PathElement) {
        if let Err(i) = self.members.binary_search(pe) {
            self.members.insert(i, pe.clone());
        }
    }

    pub(crate) fn has(&self, path: &[PathElement]) -> bool {
        match path {
            [] => false,
            [last] => self.has_member(last),
            [first, rest @ ..] => self.child(first).is_some_and(|c| c.has(rest)),
        }
    }

    pub(crate) fn has_member(&self, pe: &PathElement) -> bool {
        self.members.binary_search(pe).is_ok()
    }

    /// [`Set::has_member`] of a field, without making its element.
    pub(crate) fn has_field(&self, name: &str) -> bool {
        self.members
            .binary_search_by(|pe| by_field(pe, name))
            .is_ok()
    }

    /// [`Set::child`] of a field, without making its element.
    pub(crate) fn field_child(&self, name: &str) -> Option<&Set> {
        let i = self
            .children
            .binary_search_by(|(pe, _)| by_field(pe, name))
            .ok()?;
        self.children.get(i).map(|(_, child)| child)
    }

    /// Adds an element after those of the level: callers add them in order, or
    /// [`Set::sort`] the level once they are done.
    pub(crate) fn append(&mut self, pe: PathElement, member: bool, below: Set) {
        match (member, below.is_empty()) {
            (true, true) => self.members.push(pe),
            (true, false) => {
                self.members.push(pe.clone());
                self.children.push((pe, below));
            }
            (false, false) => self.children.push((pe, below)),
            (false, true) => {}
        }
    }

    /// Adds members, given in order.
    pub(crate) fn add_members(&mut self, members: Vec<PathElement>) {
        let mine = std::mem::take(&mut self.members);
        self.members = merge_sorted(mine, members, Ord::cmp, |a, _| a);
    }

    pub(crate) fn child(&self, pe: &PathElement) -> Option<&Set> {
        let i = self.children.binary_search_by(|(p, _)| p.cmp(pe)).ok()?;
        self.children.get(i).map(|(_, child)| child)
    }

    /// Restores the order of levels built out of order (list items are visited in the
    /// order of the list, not of their path elements). Elements must not repeat.
    pub(crate) fn sort(&mut self) {
        if !self.members.is_sorted() {
            self.members.sort();
        }
        if !self.children.is_sorted_by(|a, b| a.0 <= b.0) {
            self.children.sort_by(by_element);
        }
    }

    pub(crate) fn union(&self, other: &Set) -> Set {
        self.clone().union_owned(other.clone())
    }

    /// The union of two sets, reusing both.
    pub(crate) fn union_owned(self, other: Set) -> Set {
        let members = merge_sorted(self.members, other.members, Ord::cmp, |a, _| a);
        let children = merge_sorted(
            self.children,
            other.children,
            by_element,
            |(pe, mine), (_, theirs)| (pe, mine.union_owned(theirs)),
        );
        Set { members, children }
    }

    pub(crate) fn intersection(&self, other: &Set) -> Set {
        let mut members = self.members.clone();
        retain_matched(&mut members, &other.members, Ord::cmp, |_, m| m.is_some());
        let mut out = Set {
            members,
            children: Vec::new(),
        };
        for (pe, child) in &self.children {
            if let Some(theirs) = other.child(pe) {
                let both = child.intersection(theirs);
                if !both.is_empty() {
                    out.children.push((pe.clone(), both));
                }
            }
        }
        out
    }

    /// Paths of `self` that are not in `other`; a member of `other` does not remove what
    /// lies below it.
    pub(crate) fn difference(&self, other: &Set) -> Set {
        let mut out = self.clone();
        out.remove(other);
        out
    }

    /// [`Set::difference`] in place.
    pub(crate) fn remove(&mut self, other: &Set) {
        if self.is_empty() || other.is_empty() {
            return;
        }
        retain_matched(&mut self.members, &other.members, Ord::cmp, |_, m| {
            m.is_none()
        });
        retain_matched(
            &mut self.children,
            &other.children,
            |(pe, _), (theirs, _)| pe.cmp(theirs),
            |(_, child), theirs| match theirs {
                Some((_, theirs)) => {
                    child.remove(theirs);
                    !child.is_empty()
                }
                None => true,
            },
        );
    }

    /// Like [`Set::difference`], but a member of `other` also removes everything below it.
    #[cfg(test)]
    pub(crate) fn recursive_difference(&self, other: &Set) -> Set {
        let mut out = self.clone();
        out.remove_recursive(other);
        out
    }

    /// [`Set::recursive_difference`] in place.
    pub(crate) fn remove_recursive(&mut self, other: &Set) {
        if self.is_empty() || other.is_empty() {
            return;
        }
        retain_matched(&mut self.members, &other.members, Ord::cmp, |_, m| {
            m.is_none()
        });
        self.children.retain_mut(|(pe, child)| {
            if other.has_member(pe) {
                return false;
            }
            match other.child(pe) {
                Some(theirs) => {
                    child.remove_recursive(theirs);
                    !child.is_empty()
                }
                None => true,
            }
        });
    }

    /// Every path, in upstream's iteration order (members, then children, depth first).
    pub(crate) fn paths(&self) -> Vec<Vec<PathElement>> {
        let mut out = Vec::new();
        let mut prefix = Vec::new();
        self.collect_paths(&mut prefix, &mut out);
        out
    }

    fn collect_paths(&self, prefix: &mut Vec<PathElement>, out: &mut Vec<Vec<PathElement>>) {
        for member in &self.members {
            let mut path = prefix.clone();
            path.push(member.clone());
            out.push(path);
        }
        for (pe, child) in &self.children {
            prefix.push(pe.clone());
            child.collect_paths(prefix, out);
            prefix.pop();
        }
    }

    /// The FieldsV1 JSON of the set, by which tests compare sets.
    #[cfg(test)]
    pub(crate) fn to_fields_v1(&self) -> Value {
        Value::Object(self.fields_v1_map(false))
    }

    /// One level of FieldsV1, with `"."` when the path leading here is itself a member.
    fn fields_v1_map(&self, is_member: bool) -> Map<String, Value> {
        write_level(
            is_member,
            self.members.iter(),
            self.children.iter().map(|(pe, child)| (pe, child)),
            PathElement::serialize,
            |child, is_member| child.fields_v1_map(is_member),
        )
    }

    /// [`Set::to_fields_v1`] of a set no longer needed, whose field names become the keys.
    pub(crate) fn into_fields_v1(self) -> Value {
        Value::Object(self.into_fields_v1_map(false))
    }

    fn into_fields_v1_map(self, is_member: bool) -> Map<String, Value> {
        write_level(
            is_member,
            self.members.into_iter(),
            self.children.into_iter(),
            PathElement::into_key,
            Set::into_fields_v1_map,
        )
    }

    /// Reads FieldsV1 JSON (upstream's `FieldsToSet`).
    pub(crate) fn from_fields_v1(v: &Value) -> Result<Set, String> {
        let Value::Object(map) = v else {
            return Err("fieldsV1 must be a JSON object".to_string());
        };
        let (set, _) = read_fields_v1(map, 0)?;
        Ok(set.unwrap_or_default())
    }
}

/// One level of FieldsV1 from a set's members and children, both in order: a member without
/// children is `{}`, one with children says so with `"."` among them.
fn write_level<P: std::borrow::Borrow<PathElement>, S>(
    is_member: bool,
    members: impl Iterator<Item = P>,
    children: impl Iterator<Item = (P, S)>,
    key: impl Fn(P) -> String,
    level: impl Fn(S, bool) -> Map<String, Value>,
) -> Map<String, Value> {
    let empty = || Value::Object(Map::new());
    let mut out = Map::new();
    if is_member {
        out.insert(".".to_string(), empty());
    }
    let mut members = members.peekable();
    for (pe, child) in children {
        while let Some(leaf) = members.next_if(|m| m.borrow() < pe.borrow()) {
            out.insert(key(leaf), empty());
        }
        let is_member = members.next_if(|m| m.borrow() == pe.borrow()).is_some();
        let inner = level(child, is_member);
        out.insert(key(pe), Value::Object(inner));
    }
    for leaf in members {
        out.insert(key(leaf), empty());
    }
    out
}

/// Whether FieldsV1 JSON is exactly what [`Set::to_fields_v1`] writes for the set it reads
/// as, so that it can be written back as it is instead of being decoded and encoded again:
/// every key in its one spelling and naming a different element, `"."` only beside children
/// and only as `{}`, and nothing that reading it would reject or skip.
pub(crate) fn is_canonical_fields_v1(v: &Value) -> bool {
    matches!(v, Value::Object(map) if canonical_level(map, 0))
}

fn canonical_level(map: &Map<String, Value>, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    // The spelling check below leaves one spelling per element as far as JSON numbers go;
    // keys naming one element twice would still read as one, so they are checked for.
    let mut elements = Vec::new();
    for (key, value) in map {
        let Value::Object(inner) = value else {
            return false;
        };
        if key == "." {
            if depth == 0 || !inner.is_empty() {
                return false;
            }
            continue;
        }
        if !key.starts_with("f:") {
            match PathElement::parse(key) {
                Ok(Some(pe)) if pe.serialize() == *key => elements.push(pe),
                _ => return false,
            }
        }
        // A member without children is written `{}`, never `{".": {}}`.
        if inner.len() == 1 && inner.contains_key(".") {
            return false;
        }
        if !canonical_level(inner, depth + 1) {
            return false;
        }
    }
    elements.sort();
    elements.windows(2).all(|w| matches!(w, [a, b] if a != b))
}

/// [`Set::remove`] on canonical FieldsV1 (see [`is_canonical_fields_v1`]), in place: what
/// is left is the canonical FieldsV1 of the difference.
pub(crate) fn fields_v1_remove(fields_v1: &mut Map<String, Value>, set: &Set) {
    remove_at(fields_v1, set, &mut String::new());
}

fn remove_at(level: &mut Map<String, Value>, set: &Set, key: &mut String) {
    for pe in &set.members {
        let Some(Value::Object(inner)) = level.get_mut(&*spell(pe, key)) else {
            continue;
        };
        if inner.is_empty() {
            level.remove(&*spell(pe, key));
        } else {
            inner.remove(".");
        }
    }
    for (pe, child) in &set.children {
        let Some(Value::Object(inner)) = level.get_mut(&*spell(pe, key)) else {
            continue;
        };
        if inner.is_empty() {
            // A member without children.
            continue;
        }
        remove_at(inner, child, key);
        let member = inner.contains_key(".");
        if inner.len() == usize::from(member) {
            if member {
                inner.clear();
            } else {
                level.remove(&*spell(pe, key));
            }
        }
    }
}

/// [`Set::union`] on canonical FieldsV1 (see [`is_canonical_fields_v1`]), in place: the
/// result is the canonical FieldsV1 of the union.
pub(crate) fn fields_v1_union(fields_v1: &mut Map<String, Value>, set: &Set) {
    union_at(fields_v1, set, &mut String::new());
}

fn union_at(level: &mut Map<String, Value>, set: &Set, key: &mut String) {
    for (pe, child) in &set.children {
        match level.get_mut(&*spell(pe, key)) {
            Some(Value::Object(inner)) if !inner.is_empty() => union_at(inner, child, key),
            // A member without children gains some.
            Some(Value::Object(inner)) => *inner = child.fields_v1_map(true),
            _ => {
                level.insert(pe.serialize(), Value::Object(child.fields_v1_map(false)));
            }
        }
    }
    for pe in &set.members {
        match level.get_mut(&*spell(pe, key)) {
            Some(Value::Object(inner)) => {
                if !inner.is_empty() && !inner.contains_key(".") {
                    inner.insert(".".to_string(), Value::Object(Map::new()));
                }
            }
            _ => {
                level.insert(pe.serialize(), Value::Object(Map::new()));
            }
        }
    }
}

/// The FieldsV1 key of an element. Field keys are spelled into `key`, which the lookups of
/// a walk share: most elements are fields.
fn spell<'k>(pe: &PathElement, key: &'k mut String) -> Cow<'k, str> {
    match pe {
        PathElement::Field(name) => {
            key.clear();
            key.push_str("f:");
            key.push_str(name);
            Cow::Borrowed(key.as_str())
        }
        other => Cow::Owned(other.serialize()),
    }
}

/// One level of FieldsV1: the children read, and whether this level is itself a member (it
/// says `"."`, or it is a leaf `{}`).
fn read_fields_v1(map: &Map<String, Value>, depth: usize) -> Result<(Option<Set>, bool), String> {
    if depth > MAX_DEPTH {
        return Err("fieldsV1 is nested too deeply".to_string());
    }
    let mut children: Option<Set> = None;
    let mut is_member = false;
    for (key, value) in map {
        if key == "." {
            is_member = true;
            continue;
        }
        let Some(pe) =
            PathElement::parse(key).map_err(|e| format!("parsing key as path element: {e}"))?
        else {
            continue;
        };
        let Value::Object(inner) = value else {
            return Err(format!("the value of {key:?} is not a JSON object"));
        };
        let (grandchildren, child_is_member) = read_fields_v1(inner, depth + 1)?;
        let grandchildren = grandchildren.filter(|g| !g.is_empty());
        if !child_is_member && grandchildren.is_none() {
            continue;
        }
        let set = children.get_or_insert_with(Set::default);
        match grandchildren {
            Some(grandchildren) => {
                if child_is_member {
                    set.members.push(pe.clone());
                }
                set.children.push((pe, grandchildren));
            }
            None => set.members.push(pe),
        }
    }
    if let Some(set) = &mut children {
        // Keys are in text order, which differs from the elements' order across kinds, and
        // different texts can name one element (`k:` keys with their fields reordered).
        set.sort();
        set.members.dedup();
        dedup_children(&mut set.children);
    }
    if children.is_none() {
        is_member = true;
    }
    Ok((children, is_member))
}

/// Merges children that name the same element, as inserting them into a map would.
fn dedup_children(children: &mut Vec<(PathElement, Set)>) {
    if children
        .windows(2)
        .all(|w| matches!(w, [a, b] if a.0 != b.0))
    {
        return;
    }
    let merged = std::mem::take(children);
    for (pe, child) in merged {
        match children.last_mut() {
            Some((last, mine)) if *last == pe => {
                // The later key replaced the earlier one in the map.
                *mine = child;
            }
            _ => children.push((pe, child)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(name: &str) -> PathElement {
        PathElement::Field(name.to_string())
    }

    #[test]
    fn fields_v1_round_trips() {
        let v = json!({
            "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"a\"}": {".": {}, "f:image": {}}}}
        });
        let set = Set::from_fields_v1(&v).unwrap();
        assert!(set.has(&[f("metadata"), f("labels")]));
        assert!(set.has(&[f("metadata"), f("labels"), f("app")]));
        assert!(!set.has(&[f("metadata")]));
        assert_eq!(set.to_fields_v1(), v);
    }

    #[test]
    fn differences() {
        let mut a = Set::default();
        a.insert(&[f("spec"), f("replicas")]);
        a.insert(&[f("spec"), f("template"), f("x")]);
        let mut b = Set::default();
        b.insert(&[f("spec"), f("template")]);
        assert_eq!(a.difference(&b), a);
        let r = a.recursive_difference(&b);
        assert!(r.has(&[f("spec"), f("replicas")]));
        assert!(!r.has(&[f("spec"), f("template"), f("x")]));
        assert!(a.intersection(&b).is_empty());
    }

    #[test]
    fn bad_fields_v1_is_an_error() {
        assert!(Set::from_fields_v1(&json!({"f:a": 1})).is_err());
        assert!(Set::from_fields_v1(&json!([])).is_err());
        assert!(Set::from_fields_v1(&json!({"k:{": {}})).is_err());
        let mut deep = json!({});
        for _ in 0..500 {
            deep = json!({ "f:a": deep });
        }
        assert!(Set::from_fields_v1(&deep).is_err());
    }
}
