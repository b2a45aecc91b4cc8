#!/usr/bin/env python3
"""Generates crates/canopy-api/src/generated/proto_messages.rs: the protobuf layout of the
messages Canopy decodes from `application/vnd.kubernetes.protobuf` request bodies.

Two sources are joined:
  * k8s-pb 0.9.0 (prost structs generated from upstream's generated.proto files) gives each
    message's fields: tag, protobuf type, label, and the message type of nested fields;
  * k8s-openapi 0.29 (v1_33) gives each type's definition name (`fn schema_name()`) and the
    JSON name of each Rust field (`"hostIP" => Field::Key_host_ip`).

A k8s-pb struct is matched to its k8s-openapi type by module path and name (prost changes
only the case of upstream's names: `HTTPGetAction` becomes `HttpGetAction`), its fields by
Rust field name. Only the messages reachable from the served kinds (read from
crates/canopy-api/src/registry.rs) and a few extra request/response types are written.

Types with a custom JSON form (Time, Quantity, IntOrString, ...) are written as specials
whose wire layout is checked here and decoded by hand in protobuf.rs.

Everything that cannot be mapped is an error: the table must never silently drop a field.

Usage: tools/gen-proto-messages.py [path/to/k8s-pb-0.9.0/src [path/to/k8s-openapi/src/v1_33]]
"""
import glob
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
REGISTRY = os.path.join(ROOT, "crates", "canopy-api", "src", "registry.rs")
DEST = os.path.join(ROOT, "crates", "canopy-api", "src", "generated", "proto_messages.rs")

# Request and response bodies that are not served kinds but travel as protobuf too.
EXTRA_ROOTS = [
    "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
    "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
    "io.k8s.api.autoscaling.v1.Scale",
    "io.k8s.api.core.v1.Binding",
    "io.k8s.api.authentication.v1.TokenRequest",
]

# Definition -> (special variant, expected wire layout as (tag, rust field, prost type, label)).
# The layout is checked against k8s-pb so that a changed upstream message fails here rather
# than decoding wrongly.
SPECIALS = {
    "io.k8s.apimachinery.pkg.apis.meta.v1.Time":
        ("Time", [(1, "seconds", "int64", "optional"), (2, "nanos", "int32", "optional")]),
    "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime":
        ("MicroTime", [(1, "seconds", "int64", "optional"), (2, "nanos", "int32", "optional")]),
    "io.k8s.apimachinery.pkg.apis.meta.v1.Duration":
        ("Duration", [(1, "duration", "int64", "optional")]),
    "io.k8s.apimachinery.pkg.apis.meta.v1.FieldsV1":
        ("FieldsV1", [(1, "raw", "bytes", "optional")]),
    "io.k8s.apimachinery.pkg.runtime.RawExtension":
        ("RawExtension", [(1, "raw", "bytes", "optional")]),
    "io.k8s.apimachinery.pkg.api.resource.Quantity":
        ("Quantity", [(1, "string", "string", "optional")]),
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString":
        ("IntOrString", [(1, "type", "int64", "optional"), (2, "int_val", "int32", "optional"),
                         (3, "str_val", "string", "optional")]),
}

SCALARS = {
    "string": "String",
    "bool": "Bool",
    "int32": "Int32",
    "int64": "Int64",
    "double": "Double",
    "bytes": "Bytes",
}


def die(msg):
    sys.exit(f"gen-proto-messages: {msg}")


def find_dir(arg_index, pattern, what):
    if len(sys.argv) > arg_index:
        return sys.argv[arg_index]
    home = os.path.expanduser("~/.cargo/registry/src")
    cands = sorted(glob.glob(f"{home}/*/{pattern}"))
    if not cands:
        die(f"{what} sources not found ({pattern}); run `cargo fetch` first")
    return cands[-1]


PB = find_dir(1, "k8s-pb-0.9.0/src", "k8s-pb 0.9.0")
OPENAPI = find_dir(2, "k8s-openapi-0.29.*/src/v1_33", "k8s-openapi 0.29")
# k8s-pb 0.9.0 is generated from a newer release than the served one; its extra fields are
# recognised by their presence in these later API versions of k8s-openapi.
NEWER = sorted(glob.glob(os.path.join(os.path.dirname(OPENAPI), "v1_3[4-9]")))


def split_type(text, start):
    """Returns the field type starting at `start` (up to the `,` that ends the field) and
    the index after that comma."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "," and depth == 0:
            return text[start:i].strip(), i + 1
        elif c == "}" and depth == 0:
            break
        i += 1
    die(f"unterminated field type at: {text[start:start + 80]!r}")


def generic_args(ty):
    """`A<B, C<D>>` -> ("A", ["B", "C<D>"])."""
    ty = re.sub(r"\s+", "", ty)
    lt = ty.find("<")
    if lt < 0:
        return ty, []
    if not ty.endswith(">"):
        die(f"malformed type {ty}")
    inner = ty[lt + 1:-1]
    args, depth, cur = [], 0, ""
    for c in inner:
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        if c == "," and depth == 0:
            args.append(cur)
            cur = ""
        else:
            cur += c
    args.append(cur)
    # rustfmt leaves a trailing comma after a multi-line last argument.
    if args[-1] == "":
        args.pop()
    return ty[:lt], args


def resolve(module, path):
    """Resolves a prost type path relative to `module` (a list of module names) to
    (module list, struct name)."""
    parts = path.split("::")
    if parts[0] in ("crate", ""):
        die(f"absolute type path {path} not expected")
    mod = list(module)
    while parts and parts[0] == "super":
        if not mod:
            die(f"{path} climbs above the crate root from {'::'.join(module)}")
        mod.pop()
        parts.pop(0)
    return tuple(mod + parts[:-1]), parts[-1]


def message_type(module, ty):
    """The message type inside a field's Rust type: Option<T>, Option<Box<T>>, Vec<T>, T."""
    head, args = generic_args(ty)
    for wrapper in ("::core::option::Option", "::prost::alloc::vec::Vec", "::prost::alloc::boxed::Box"):
        if head == wrapper:
            if len(args) != 1:
                die(f"unexpected type {ty}")
            return message_type(module, args[0])
    if args:
        die(f"unexpected generic message type {ty}")
    return resolve(module, head)


def parse_pb():
    """(module tuple, struct name) -> list of fields (tag, rust name, kind, label, target)."""
    messages = {}
    for path in sorted(glob.glob(f"{PB}/**/mod.rs", recursive=True)):
        rel = os.path.relpath(os.path.dirname(path), PB)
        module = tuple(rel.split(os.sep)) if rel != "." else ()
        text = "\n".join(line for line in open(path).read().split("\n")
                         if not line.lstrip().startswith("//"))
        for m in re.finditer(r"#\[derive\(([^)]*)\)\]\s*pub struct (\w+) \{", text):
            if "::prost::Message" not in m.group(1):
                continue
            name = m.group(2)
            end = text.find("\n}", m.end())
            body = text[m.end():end]
            fields = []
            pos = 0
            for a in re.finditer(r"#\[prost\(([^\]]*)\)\]\s*pub (r#\w+|\w+):", body):
                if a.start() < pos:
                    die(f"{name}: overlapping fields")
                attrs, rust = a.group(1), a.group(2)
                ty, pos = split_type(body, a.end())
                tag_m = re.search(r'tag = "(\d+)"', attrs)
                if not tag_m:
                    die(f"{name}.{rust}: no tag in {attrs}")
                tag = int(tag_m.group(1))
                rust = rust.removeprefix("r#")
                if attrs.startswith("btree_map"):
                    first = attrs[:attrs.index('"', attrs.index('"') + 1) + 1]
                    kv = re.match(r'btree_map = "(\w+), (\w+)"', first)
                    if not kv or kv.group(1) != "string":
                        die(f"{name}.{rust}: unsupported map {first}")
                    value = kv.group(2)
                    target = None
                    if value == "message":
                        head, args = generic_args(ty)
                        if not head.endswith("BTreeMap") or len(args) != 2:
                            die(f"{name}.{rust}: unexpected map type {ty}")
                        target = resolve(module, args[1])
                    elif value not in SCALARS:
                        die(f"{name}.{rust}: unsupported map value {value}")
                    fields.append((tag, rust, value, "map", target))
                    continue
                kind = attrs.split(",")[0].split("=")[0].strip()
                labels = [x.strip() for x in attrs.split(",")[1:]]
                if "repeated" in labels:
                    label = "repeated"
                elif "optional" in labels:
                    label = "optional"
                else:
                    die(f"{name}.{rust}: no label in {attrs}")
                for extra in labels:
                    if extra in ("repeated", "optional", "boxed") or extra.startswith("tag =") \
                            or extra.startswith("packed ="):
                        continue
                    die(f"{name}.{rust}: unsupported prost attribute {extra}")
                if kind == "message":
                    target = message_type(module, ty)
                elif kind in SCALARS:
                    target = None
                else:
                    die(f"{name}.{rust}: unsupported protobuf type {kind}")
                fields.append((tag, rust, kind, label, target))
            if body[pos:].strip():
                die(f"{name}: unparsed struct content {body[pos:].strip()[:80]!r}")
            key = (module, name)
            if key in messages:
                die(f"duplicate message {key}")
            messages[key] = fields
    return messages


def parse_openapi(src):
    """definition name -> (module tuple, {rust field: JSON name})."""
    types = {}
    for path in sorted(glob.glob(f"{src}/**/*.rs", recursive=True)):
        text = open(path).read()
        names = re.findall(r'fn schema_name\(\)[^{]*\{\s*"([^"]+)"\.into\(\)', text)
        if not names:
            continue
        if len(names) != 1:
            die(f"{path}: several schema names")
        rel = os.path.relpath(os.path.dirname(path), src)
        module = tuple(rel.split(os.sep)) if rel != "." else ()
        fields = {}
        for js, rust in re.findall(r'"([^"]+)" => Field::Key_(\w+),', text):
            if rust in fields and fields[rust] != js:
                die(f"{names[0]}: field {rust} has two JSON names")
            fields[rust] = js
        if names[0] in types:
            die(f"duplicate definition {names[0]}")
        types[names[0]] = (module, fields)
    return types


def normalize(rust):
    return rust.replace("_", "").lower()


def served_roots():
    text = open(REGISTRY).read()
    start = text.find("pub static BUILTIN")
    end = text.find("\n];", start)
    if start < 0 or end < 0:
        die(f"no BUILTIN table in {REGISTRY}")
    # Canopy's own kinds (io.canopy.*) have no protobuf form: clients send them as JSON.
    roots = [d for d in re.findall(r'definition: "([^"]+)"', text[start:end])
             if not d.startswith("io.canopy.")]
    if not roots:
        die("BUILTIN lists no definitions")
    return roots


def main():
    pb = parse_pb()
    openapi = parse_openapi(OPENAPI)
    newer = [parse_openapi(src) for src in NEWER]
    if not newer:
        die(f"no newer k8s-openapi API versions next to {OPENAPI}")
    skipped = []

    # (module, lowercased name) -> definition, for joining prost's renamed structs.
    by_pb_name = {}
    for definition, (module, _) in openapi.items():
        key = (module, definition.rsplit(".", 1)[1].lower())
        if key in by_pb_name:
            die(f"ambiguous names {definition} and {by_pb_name[key]}")
        by_pb_name[key] = definition

    def definition_of(key):
        """The definition a k8s-pb message joins to, None if k8s-openapi has no such type."""
        module, name = key
        d = by_pb_name.get((module, name.lower()))
        if d is None:
            candidate = "io.k8s." + ".".join(module) + "." + name
            return candidate if candidate in SPECIALS else None
        return d

    pb_of = {}
    for key in pb:
        module, name = key
        d = definition_of(key) or "io.k8s." + ".".join(module) + "." + name
        if d in pb_of:
            die(f"two k8s-pb messages for {d}")
        pb_of[d] = key

    def json_name(source, rust, table):
        """The JSON name of a k8s-pb field in a k8s-openapi type. The Rust names are joined
        without case and underscores: the two generators split upstream's names differently
        (`targetWWNs` is `target_ww_ns` in k8s-pb, `target_wwns` in k8s-openapi; `type` is
        `r#type` and `type_`)."""
        fields = table[source][1] if source in table else {}
        found = {js for r, js in fields.items() if normalize(r) == normalize(rust)}
        if len(found) > 1:
            die(f"{source}: field {rust} matches several JSON names {sorted(found)}")
        return found.pop() if found else None

    def embeds(source, target, depth=0):
        """Whether every field of the k8s-pb message `target` is a JSON field of `source`
        (directly or through a further embedded message)."""
        if depth > 8:
            die(f"embedding of {target} in {source} too deep")
        for _, rust, kind, label, inner in pb[target]:
            if json_name(source, rust, openapi) or any(json_name(source, rust, n) for n in newer):
                continue
            if kind == "message" and label == "optional" and embeds(source, inner, depth + 1):
                continue
            return False
        return True

    # protobuf.rs decodes these by hand, reachable or not: their layout must be as it expects.
    for definition, (_, layout) in sorted(SPECIALS.items()):
        if definition not in pb_of:
            die(f"{definition} has no k8s-pb message")
        got = sorted((t, r, k, label) for t, r, k, label, _ in pb[pb_of[definition]])
        if got != sorted(layout):
            die(f"{definition}: wire layout {got} differs from the expected {layout}")

    roots = served_roots() + EXTRA_ROOTS
    out_messages = {}
    # Messages embedded inline in Go (`json:",inline"`, e.g. VolumeSource in Volume): nested
    # on the wire, flattened in JSON, so they take their JSON names from the embedding type.
    inline_source = {}
    # (definition, definition giving the JSON names of its fields)
    todo = [(d, d) for d in reversed(roots)]
    while todo:
        definition, source = todo.pop()
        if definition in out_messages:
            if inline_source.get(definition, definition) != source:
                die(f"{definition} is embedded in both {inline_source.get(definition)} and {source}")
            continue
        key = pb_of.get(definition)
        if key is None:
            die(f"{definition} has no k8s-pb message")
        fields = pb[key]
        if definition in SPECIALS:
            out_messages[definition] = (SPECIALS[definition][0], [])
            continue
        if source not in openapi:
            die(f"{definition} has no k8s-openapi type")
        rows = []
        seen_tags = set()
        for tag, rust, kind, label, target in fields:
            if tag in seen_tags:
                die(f"{definition}: tag {tag} used twice")
            seen_tags.add(tag)
            js = json_name(source, rust, openapi)
            later = [x for x in (json_name(source, rust, n) for n in newer) if x]
            if js is None and later:
                # Newer than the served API: decoded like any unknown tag (skipped), as the
                # served release's apiserver would.
                skipped.append((definition, tag, later[0]))
                continue
            if js is None and kind == "message" and label == "optional" \
                    and embeds(source, target):
                inline = definition_of(target)
                if inline is None:
                    inline = "io.k8s." + ".".join(target[0]) + "." + target[1]
                    inline_source[inline] = source
                    todo.append((inline, source))
                else:
                    for _, inner, _, _, _ in pb[target]:
                        if json_name(inline, inner, openapi) != json_name(source, inner, openapi):
                            die(f"{definition} embeds {inline} with a renamed field {inner}")
                    todo.append((inline, inline))
                rows.append((tag, "", kind, "inline", inline))
                continue
            if js is None:
                die(f"{definition}: k8s-pb field {rust} (tag {tag}) has no JSON name in k8s-openapi")
            target_def = None
            if target is not None:
                target_def = definition_of(target)
                if target_def is None:
                    die(f"{definition}.{js}: k8s-pb message {target} has no k8s-openapi type")
                todo.append((target_def, target_def))
            rows.append((tag, js, kind, label, target_def))

        out_messages[definition] = (None, sorted(rows))

    def flattened(definition):
        names = []
        for _, js, _, label, target in out_messages[definition][1]:
            names.extend(flattened(target) if label == "inline" else [js])
        return names

    for definition, (special, rows) in sorted(out_messages.items()):
        if special or definition in inline_source:
            continue
        names = flattened(definition)
        if len(names) != len(set(names)):
            die(f"{definition}: a JSON name appears twice among its (inline) fields")
        for js in openapi[definition][1].values():
            if js not in names and js not in ("apiVersion", "kind"):
                die(f"{definition}: JSON field {js} has no protobuf field in k8s-pb")

    def kind_expr(kind, target):
        if kind == "message":
            return f'Kind::Message("{target}")'
        return f"Kind::{SCALARS[kind]}"

    out = [
        "// @generated by tools/gen-proto-messages.py from k8s-pb 0.9.0 and k8s-openapi 0.29 (v1_33). Do not edit.",
        "",
        "use crate::protobuf::{Field, Kind, Label, MessageDef, Special};",
        "",
        "// Fields of k8s-pb that are newer than the served API version (skipped as unknown tags):",
        *[f"//   {d} {js} = {tag}" for d, tag, js in sorted(skipped)],
        "",
        "/// Every protobuf message reachable from the served kinds, DeleteOptions, Status, Scale",
        "/// and Binding, sorted by definition name; fields sorted by tag.",
        "#[rustfmt::skip]",
        "pub static PROTO_MESSAGES: &[MessageDef] = &[",
    ]
    for definition in sorted(out_messages):
        special, rows = out_messages[definition]
        out.append("    MessageDef {")
        out.append(f'        definition: "{definition}",')
        out.append(f"        special: {'Some(Special::' + special + ')' if special else 'None'},")
        if not rows:
            out.append("        fields: &[],")
        else:
            out.append("        fields: &[")
            for tag, js, kind, label, target in rows:
                lab = {"optional": "Label::Single", "repeated": "Label::Repeated", "map": "Label::Map",
                       "inline": "Label::Inline"}[label]
                out.append(
                    f'            Field {{ tag: {tag}, json: "{js}", kind: {kind_expr(kind, target)}, label: {lab} }},')
            out.append("        ],")
        out.append("    },")
    out.append("];")
    with open(DEST, "w") as f:
        f.write("\n".join(out) + "\n")
    total = sum(len(r) for _, r in out_messages.values())
    print(f"wrote {len(out_messages)} messages ({total} fields) to {os.path.relpath(DEST, ROOT)}")


main()
