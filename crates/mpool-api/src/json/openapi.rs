//! The facade's OpenAPI 3.1 document, served at `GET /v1/openapi.json` without a token (it
//! holds nothing secret: what the .proto and this crate say anyway).
//!
//! It is generated, not written: the paths from the route table the router is built from
//! ([`super::ROUTES`]), the schemas from the descriptors of `proto/mpool/v1` that `build.rs`
//! compiles (the same source as the generated messages and their JSON mapping), with the
//! comments of the .proto as descriptions. Each message becomes a schema of its proto3 JSON
//! form (lowerCamelCase names; 64-bit integers as strings, numbers accepted; bytes as base64;
//! enums by name; durations as `"1.5s"`; timestamps as RFC 3339; unset messages left out, `null`
//! accepted; unknown fields refused). The bodies are those messages minus the fields the path
//! gives, and the collected Exec and Run answers are described from their parts as
//! `answer.rs` builds them.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

use super::answer::{EXIT_CODE, STREAMS};
use super::{Body, MAX_BODY, MAX_OUTPUTS, MAX_STREAM, RETRY_AFTER_SECS, ROUTES, Reply, Route};

/// The package the facade serves.
const PACKAGE: &str = ".mpool.v1";
/// A duration in the proto3 JSON mapping.
const DURATION_PATTERN: &str = r"^-?[0-9]+(\.[0-9]{1,9})?s$";

/// The document (built once).
pub fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| match FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) {
        Ok(set) => Schemas::new(&set).document(),
        // The set is compiled into this binary: this would be a build fault.
        Err(e) => json!({"openapi": "3.1.0", "info": {"title": "mpool", "version": "0", "description": e.to_string()}}),
    })
}

/// Where things are in a `FileDescriptorProto` (`SourceCodeInfo` paths).
mod path {
    pub const MESSAGE: i32 = 4;
    pub const ENUM: i32 = 5;
    pub const SERVICE: i32 = 6;
    pub const FIELD: i32 = 2;
    pub const NESTED: i32 = 3;
    pub const ENUM_VALUE: i32 = 2;
    pub const METHOD: i32 = 2;
}

/// The messages and enums of `mpool.v1` by full name, with their comments, and the schemas made
/// of them so far.
struct Schemas<'a> {
    messages: HashMap<String, (&'a DescriptorProto, Vec<i32>)>,
    enums: HashMap<String, (&'a EnumDescriptorProto, Vec<i32>)>,
    methods: HashMap<&'a str, Vec<i32>>,
    comments: HashMap<Vec<i32>, String>,
    /// Components referred to and not made yet.
    wanted: Vec<String>,
    made: BTreeMap<String, Value>,
}

impl<'a> Schemas<'a> {
    fn new(set: &'a FileDescriptorSet) -> Schemas<'a> {
        let mut s = Schemas {
            messages: HashMap::new(),
            enums: HashMap::new(),
            methods: HashMap::new(),
            comments: HashMap::new(),
            wanted: Vec::new(),
            made: BTreeMap::new(),
        };
        for file in set.file.iter().filter(|f| f.package() == &PACKAGE[1..]) {
            for (i, m) in (0..).zip(&file.message_type) {
                s.add_message(format!("{PACKAGE}.{}", m.name()), m, vec![path::MESSAGE, i]);
            }
            for (i, e) in (0..).zip(&file.enum_type) {
                s.enums.insert(format!("{PACKAGE}.{}", e.name()), (e, vec![path::ENUM, i]));
            }
            for (i, service) in (0..).zip(&file.service) {
                for (j, m) in (0..).zip(&service.method) {
                    s.methods.insert(m.name(), vec![path::SERVICE, i, path::METHOD, j]);
                }
            }
            for l in file.source_code_info.iter().flat_map(|i| &i.location) {
                let text: Vec<&str> = l.leading_comments().lines().map(str::trim).filter(|t| !t.is_empty()).collect();
                if !text.is_empty() {
                    s.comments.insert(l.path.clone(), text.join(" "));
                }
            }
        }
        s
    }

    fn add_message(&mut self, name: String, m: &'a DescriptorProto, at: Vec<i32>) {
        for (k, nested) in (0..).zip(&m.nested_type) {
            let mut p = at.clone();
            p.extend([path::NESTED, k]);
            self.add_message(format!("{name}.{}", nested.name()), nested, p);
        }
        self.messages.insert(name, (m, at));
    }

    fn comment(&self, at: &[i32]) -> Option<&str> {
        self.comments.get(at).map(String::as_str)
    }

    /// A `$ref` to the component of a message or enum (made later).
    fn reference(&mut self, full_name: &str) -> Value {
        let short = full_name.rsplit('.').next().unwrap_or(full_name).to_string();
        if !self.made.contains_key(&short) && !self.wanted.contains(&full_name.to_string()) {
            self.wanted.push(full_name.to_string());
        }
        json!({ "$ref": format!("#/components/schemas/{short}") })
    }

    /// A message's schema.
    fn message(&mut self, full_name: &str) -> Value {
        self.message_without(full_name, &[])
    }

    /// A message's schema without some of its fields (by JSON name).
    fn message_without(&mut self, full_name: &str, without: &[&str]) -> Value {
        let Some((m, at)) = self.messages.get(full_name).cloned() else {
            return json!({ "description": format!("{full_name} (not in the descriptors)") });
        };
        let mut properties = Map::new();
        for (j, f) in (0..).zip(&m.field).filter(|(_, f)| !without.contains(&f.json_name())) {
            let mut schema = self.field(f);
            let mut p = at.clone();
            p.extend([path::FIELD, j]);
            if let (Some(c), Value::Object(o)) = (self.comment(&p).map(str::to_string), &mut schema) {
                o.insert("description".into(), c.into());
            }
            properties.insert(f.json_name().to_string(), schema);
        }
        let mut schema = json!({ "type": "object", "properties": properties, "additionalProperties": false });
        if let Some(c) = self.comment(&at) {
            schema["description"] = c.into();
        }
        schema
    }

    /// An enum's schema: its value names.
    fn enumeration(&self, full_name: &str) -> Value {
        let Some((e, at)) = self.enums.get(full_name) else {
            return json!({ "description": format!("{full_name} (not in the descriptors)") });
        };
        let mut text = self.comment(at).unwrap_or_default().to_string();
        for (k, v) in (0..).zip(&e.value) {
            let mut p = at.clone();
            p.extend([path::ENUM_VALUE, k]);
            text.push_str(&format!("\n- `{}`: {}", v.name(), self.comment(&p).unwrap_or_default()));
        }
        let names: Vec<&str> = e.value.iter().map(|v| v.name()).collect();
        json!({ "type": "string", "enum": names, "description": text })
    }

    /// A field's schema in the proto3 JSON mapping.
    fn field(&mut self, f: &FieldDescriptorProto) -> Value {
        if f.label() == Label::Repeated {
            let entry = self.messages.get(f.type_name()).map(|(m, _)| *m);
            if let Some(entry) = entry.filter(|m| m.options.as_ref().is_some_and(|o| o.map_entry())) {
                let value = entry.field.get(1).map(|v| self.single(v)).unwrap_or_else(|| json!({}));
                return json!({ "type": "object", "additionalProperties": value });
            }
            return json!({ "type": "array", "items": self.single(f) });
        }
        let schema = self.single(f);
        if f.r#type() == Type::Message { json!({ "anyOf": [schema, { "type": "null" }] }) } else { schema }
    }

    fn single(&mut self, f: &FieldDescriptorProto) -> Value {
        match f.r#type() {
            Type::String => json!({ "type": "string" }),
            Type::Bool => json!({ "type": "boolean" }),
            Type::Int32 | Type::Sint32 | Type::Sfixed32 => json!({ "type": "integer", "format": "int32" }),
            Type::Uint32 | Type::Fixed32 => json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX }),
            Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
                json!({ "type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]+$" })
            }
            Type::Uint64 | Type::Fixed64 => {
                json!({ "type": ["string", "integer"], "format": "uint64", "pattern": "^[0-9]+$", "minimum": 0 })
            }
            Type::Double | Type::Float => json!({ "type": "number" }),
            Type::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
            Type::Enum => self.reference(f.type_name()),
            Type::Message => match f.type_name() {
                ".google.protobuf.Duration" => {
                    json!({ "type": "string", "pattern": DURATION_PATTERN, "examples": ["30s", "1.5s"] })
                }
                ".google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
                other => self.reference(other),
            },
            Type::Group => json!({}),
        }
    }

    /// Makes every component referred to so far.
    fn make_wanted(&mut self) {
        while let Some(full) = self.wanted.pop() {
            let short = full.rsplit('.').next().unwrap_or(&full).to_string();
            if self.made.contains_key(&short) {
                continue;
            }
            let schema = if self.enums.contains_key(&full) { self.enumeration(&full) } else { self.message(&full) };
            self.made.insert(short, schema);
        }
    }

    /// A body: the message without the fields the path gives or HTTP does not take.
    fn body(&mut self, name: &str, without: &[&str]) -> Value {
        self.message_without(&format!("{PACKAGE}.{name}"), without)
    }

    /// The properties of a message's schema.
    fn properties(&mut self, name: &str) -> Map<String, Value> {
        match self.message(&format!("{PACKAGE}.{name}")).get_mut("properties").map(Value::take) {
            Some(Value::Object(p)) => p,
            _ => Map::new(),
        }
    }

    /// `ExitStatus`'s fields as the collected answers carry them, and the streams.
    fn exit_and_streams(&mut self, into: &mut Map<String, Value>) {
        for (k, v) in self.properties("ExitStatus") {
            into.insert(if k == "code" { EXIT_CODE.into() } else { k }, v);
        }
        for (i, (text, flag)) in STREAMS.into_iter().enumerate() {
            let which = if i == 0 { "stdout" } else { "stderr" };
            into.insert(
                text.into(),
                json!({ "type": "string", "description": format!("The command's {which} (UTF-8), cut after {MAX_STREAM} bytes.") }),
            );
            into.insert(flag.into(), json!({ "type": "boolean", "description": format!("Whether {text} was cut.") }));
        }
    }

    /// The collected Exec answer.
    fn exec_answer(&mut self) -> Value {
        let mut p = Map::new();
        p.insert("execId".into(), json!({ "type": "string", "description": "The exec id (for CancelExec)." }));
        p.insert("session".into(), json!({ "type": "string", "description": "With `detach`: the session's id (follow it with .../sessions/{session}/attach)." }));
        p.insert("detached".into(), json!({ "type": "boolean", "description": "With `detach`: true; the answer then carries only execId and session." }));
        self.exit_and_streams(&mut p);
        json!({
            "type": "object",
            "description": "An Exec collected into one answer: how the command ended (ExitStatus's fields, `code` as `exitCode`) and its output; with `detach`, only the session's id.",
            "properties": p,
            "additionalProperties": false,
        })
    }

    /// The collected Run answer.
    fn run_answer(&mut self) -> Value {
        let mut p = self.properties("RunResult");
        p.remove("exit");
        self.exit_and_streams(&mut p);
        p.insert(
            "leaseId".into(),
            json!({ "type": "string", "description": "The lease the run held (released at its end)." }),
        );
        let mut file = self.message(&format!("{PACKAGE}.OutputFile"));
        file["properties"]["data"] = json!({
            "type": "string",
            "contentEncoding": "base64",
            "description": format!("The file's content; empty when it is missing, failed, or omitted (all outputs of an answer together carry at most {MAX_OUTPUTS} bytes)."),
        });
        let mut outputs = json!({ "type": "array", "items": file });
        if let Some(d) = p.get("outputs").and_then(|o| o.get("description")).cloned() {
            outputs["description"] = d;
        }
        p.insert("outputs".into(), outputs);
        json!({
            "type": "object",
            "description": "A Run collected into one answer: RunResult's fields with its exit status at the top level (`code` as `exitCode`), the output, the lease id, and each output file's content.",
            "properties": p,
            "additionalProperties": false,
        })
    }

    fn reply(&mut self, reply: Reply) -> Value {
        match reply {
            Reply::Message(name) => self.reference(&format!("{PACKAGE}.{name}")),
            Reply::Run => json!({ "$ref": "#/components/schemas/RunAnswer" }),
            Reply::Exec => json!({ "$ref": "#/components/schemas/ExecAnswer" }),
            Reply::Lines(name) => self.reference(&format!("{PACKAGE}.{name}")),
            Reply::Health => json!({ "$ref": "#/components/schemas/Health" }),
            Reply::ServerHealth => json!({ "$ref": "#/components/schemas/ServerHealth" }),
            Reply::History => json!({ "$ref": "#/components/schemas/History" }),
            Reply::OpenApi => json!({ "type": "object", "description": "An OpenAPI 3.1 document." }),
        }
    }

    fn operation(&mut self, r: &Route) -> Value {
        let mut op = json!({
            "operationId": operation_id(r),
            "summary": r.summary,
            "security": if r.auth { json!([{ "bearer": [] }]) } else { json!([]) },
        });
        if let Some(rpc) = r.rpc {
            let at = self.methods.get(rpc).cloned().unwrap_or_default();
            let text = self.comment(&at).unwrap_or_default();
            op["description"] = format!("{text} (gRPC: `mpool.v1.Pool/{rpc}`)").trim().into();
        }
        let parameters: Vec<Value> = params(r.path)
            .map(|p| json!({ "name": p, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        if !parameters.is_empty() {
            op["parameters"] = parameters.into();
        }
        let reply = self.reply(r.reply);
        let mut responses = match r.reply {
            Reply::Lines(_) => json!({
                "200": { "description": "A stream: one JSON object per line, each as it happens.", "content": { "application/x-ndjson": { "schema": reply.clone() } } },
            }),
            _ => json!({
                "200": { "description": "Done.", "content": { "application/json": { "schema": reply.clone() } } },
            }),
        };
        match r.body {
            Body::None => {}
            Body::Message { name, without } => {
                op["requestBody"] = json!({
                    "required": false,
                    "description": format!("`{name}` in proto3 JSON, without {}; an empty body is the default message.", without.join(", ")),
                    "content": { "application/json": { "schema": self.body(name, without) } },
                });
                responses["413"] = error(&format!("The body is over {MAX_BODY} bytes."));
            }
        }
        if r.auth {
            responses["401"] = error("No token, or an unknown one (a `WWW-Authenticate` header says Bearer).");
        }
        if matches!(r.reply, Reply::Health) {
            responses["503"] =
                json!({ "description": "Not serving.", "content": { "application/json": { "schema": reply } } });
        } else if r.rpc.is_some() {
            responses["503"] =
                error("RESOURCE_EXHAUSTED or UNAVAILABLE: worth retrying as is, after `Retry-After` seconds.");
            responses["503"]["headers"] = json!({ "Retry-After": { "schema": { "type": "integer" }, "description": format!("{RETRY_AFTER_SECS}") } });
            responses["default"] = error(
                "A failure: INVALID_ARGUMENT 400, PERMISSION_DENIED 403, NOT_FOUND 404, FAILED_PRECONDITION 409, anything else 500.",
            );
        }
        op["responses"] = responses;
        op
    }

    fn document(mut self) -> Value {
        let mut paths = Map::new();
        for r in ROUTES {
            let op = self.operation(r);
            let item = paths.entry(r.path).or_insert_with(|| json!({}));
            item[r.method.as_str().to_ascii_lowercase()] = op;
        }
        let (run, exec) = (self.run_answer(), self.exec_answer());
        self.make_wanted();
        let mut schemas = std::mem::take(&mut self.made);
        schemas.insert("RunAnswer".into(), run);
        schemas.insert("ExecAnswer".into(), exec);
        schemas.insert(
            "Health".into(),
            json!({
                "type": "object",
                "properties": { "status": { "type": "string", "enum": ["SERVING", "NOT_SERVING"] } },
                "required": ["status"],
            }),
        );
        schemas.insert(
            "ServerHealth".into(),
            json!({
                "type": "object",
                "properties": {
                    "status": { "type": "string", "enum": ["SERVING", "NOT_SERVING"] },
                    "daemon": {
                        "type": "object",
                        "properties": { "ok": { "type": "boolean" }, "queuedCalls": { "type": "integer", "minimum": 0 } },
                        "required": ["ok", "queuedCalls"],
                    },
                    "store": {
                        "type": "object",
                        "properties": { "ok": { "type": "boolean" }, "error": { "type": "string" } },
                        "required": ["ok", "error"],
                    },
                    "reconciled": { "type": "boolean" },
                },
                "required": ["status", "daemon", "store", "reconciled"],
            }),
        );
        let point = json!({
            "type": "object",
            "properties": {
                "minute": { "type": "string", "format": "date-time" },
                "count": { "type": "integer", "minimum": 0 },
                "meanSeconds": { "type": "number" },
                "maxSeconds": { "type": "number" },
            },
            "required": ["minute", "count", "meanSeconds", "maxSeconds"],
        });
        schemas.insert(
            "History".into(),
            json!({
                "type": "object",
                "description": "One point per minute for the last hour, oldest first, per pool the caller may use (aggregates only).",
                "properties": {
                    "now": { "type": "string", "format": "date-time" },
                    "pools": { "type": "array", "items": {
                        "type": "object",
                        "properties": {
                            "pool": { "type": "string" },
                            "acquire": { "type": "array", "items": point.clone() },
                            "reset": { "type": "array", "items": point },
                        },
                        "required": ["pool", "acquire", "reset"],
                    } },
                },
                "required": ["now", "pools"],
            }),
        );
        schemas.insert(
            "Error".into(),
            json!({
                "type": "object",
                "description": "A failed request: the gRPC status code's name and what to do.",
                "properties": { "code": { "type": "string", "examples": ["NOT_FOUND"] }, "message": { "type": "string" } },
                "required": ["code", "message"],
            }),
        );
        json!({
            "openapi": "3.1.0",
            "info": {
                "title": "mpool HTTP/JSON facade",
                "version": env!("CARGO_PKG_VERSION"),
                "description": format!(
                    "The `mpool.v1.Pool` service over HTTP/1.1 and JSON (`[api] http_listen`): the messages of \
                     proto/mpool/v1 in the proto3 JSON mapping. Exec and Run are collected into one answer each. \
                     Bodies are at most {MAX_BODY} bytes. A command that exits non-zero is still a 200."
                ),
            },
            "paths": paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A token of the server's tokens_file (`mpool token new`) on TCP; with client_ca, the client certificate instead; nothing on a Unix socket.",
                    },
                },
            },
        })
    }
}

/// A failure answer.
fn error(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// The `{name}` parameters of a path.
fn params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

/// `post /v1/leases/{id}/exec` as `post_v1_leases_id_exec`.
fn operation_id(r: &Route) -> String {
    let mut id = r.method.as_str().to_ascii_lowercase();
    for part in r.path.split('/').filter(|s| !s.is_empty()) {
        id.push('_');
        id.extend(part.chars().filter(|c| c.is_ascii_alphanumeric()));
    }
    id
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A validator for the schema at `pointer` in the document (its `$ref`s resolve in it).
    fn validator(doc: &Value, pointer: &str) -> jsonschema::Validator {
        let mut root = doc.clone();
        root["$ref"] = format!("#{}", pointer.replace('{', "%7B").replace('}', "%7D")).into();
        jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{pointer}: {e}"))
    }

    #[test]
    fn every_route_is_documented_with_its_schemas() {
        let doc = document();
        for r in ROUTES {
            let method = r.method.as_str().to_ascii_lowercase();
            let op = &doc["paths"][r.path][&method];
            assert!(op.is_object(), "{} {} is not in the document", r.method, r.path);
            for p in params(r.path) {
                assert!(op["parameters"].as_array().unwrap().iter().any(|q| q["name"] == p), "{}: {p}", r.path);
            }
            let esc = r.path.replace('~', "~0").replace('/', "~1");
            let media = if matches!(r.reply, Reply::Lines(_)) { "application~1x-ndjson" } else { "application~1json" };
            validator(doc, &format!("/paths/{esc}/{method}/responses/200/content/{media}/schema"));
            if let Body::Message { without, .. } = r.body {
                let pointer = format!("/paths/{esc}/{method}/requestBody/content/application~1json/schema");
                let v = validator(doc, &pointer);
                assert!(v.is_valid(&json!({})));
                for f in without {
                    assert!(!v.is_valid(&json!({ *f: "x" })), "{} {}: {f} is taken from the path", r.method, r.path);
                }
                assert!(!v.is_valid(&json!({ "noSuchField": 1 })));
            }
        }
        let documented: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(documented, ROUTES.len(), "every documented operation is a route");
        assert_eq!(doc["openapi"], "3.1.0");
    }

    /// `{{ expression }}` (what Kestra renders) as `x`.
    fn rendered(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").map_or(rest.len(), |e| start + e + 2);
            out.push('x');
            rest = &rest[end..];
        }
        out + rest
    }

    /// The route a path (with rendered parameters) and method ask for.
    fn route_of(method: &str, path: &str) -> Option<&'static Route> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        ROUTES.iter().find(|r| {
            let pattern: Vec<&str> = r.path.trim_matches('/').split('/').collect();
            r.method.as_str().eq_ignore_ascii_case(method)
                && pattern.len() == segments.len()
                && pattern.iter().zip(&segments).all(|(p, s)| p.starts_with('{') || p == s)
        })
    }

    #[test]
    fn the_kestra_example_requests_fit_the_document() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kestra/http-request.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        let flow = &yaml_rust2::YamlLoader::load_from_str(&text).unwrap()[0];
        let doc = document();
        let tasks = flow["tasks"].as_vec().unwrap().iter().chain(flow["finally"].as_vec().into_iter().flatten());
        let (mut requests, mut bodies) = (0, 0);
        for task in tasks.filter(|t| t["type"].as_str() == Some("io.kestra.plugin.core.http.Request")) {
            requests += 1;
            let (uri, method) = (rendered(task["uri"].as_str().unwrap()), task["method"].as_str().unwrap());
            let path = &uri[uri.find("/v1/").unwrap_or_else(|| panic!("{uri}: no /v1/ path"))..];
            let route = route_of(method, path).unwrap_or_else(|| panic!("{method} {path} is no route of the facade"));
            let Some(body) = task["body"].as_str() else { continue };
            let body: Value = serde_json::from_str(&rendered(body)).unwrap_or_else(|e| panic!("{path}: {e}"));
            let esc = route.path.replace('/', "~1");
            let v = validator(
                doc,
                &format!("/paths/{esc}/{}/requestBody/content/application~1json/schema", method.to_ascii_lowercase()),
            );
            let errors: Vec<String> = v.iter_errors(&body).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{method} {path}: {body}: {errors:?}");
            bodies += 1;
        }
        assert!(requests >= 4 && bodies >= 3, "{requests} requests, {bodies} bodies in {}", file.display());
        // The validator does refuse a typo.
        let v = validator(doc, "/paths/~1v1~1pools~1%7Bpool%7D~1run/post/requestBody/content/application~1json/schema");
        assert!(!v.is_valid(&json!({"comand": {"script": "true"}})));
    }

    #[test]
    fn schemas_follow_the_proto3_json_mapping() {
        let doc = document();
        let lease = validator(doc, "/components/schemas/Lease");
        let good = json!({"id": "l", "pool": "ci", "vm": "v", "holder": "", "requestId": "", "grantedAt": "2025-01-02T03:04:05Z",
                          "expiresAt": null, "served": "SERVED_HOT", "waited": "0.250s"});
        assert!(lease.is_valid(&good), "{:?}", lease.iter_errors(&good).map(|e| e.to_string()).collect::<Vec<_>>());
        assert!(!lease.is_valid(&json!({"served": "HOT"})));
        assert!(!lease.is_valid(&json!({"waited": "5m"})));
        let pool = validator(doc, "/components/schemas/PoolInfo");
        assert!(
            pool.is_valid(&json!({"vms": {"hot": 1}, "generation": "3", "config": {"reset": "RESET_STRATEGY_CLONE"}}))
        );
        assert!(!pool.is_valid(&json!({"generation": "x"})));
        let described = &doc["components"]["schemas"]["Lease"]["properties"]["id"]["description"];
        assert!(described.as_str().is_some_and(|d| d.contains("pass it to Exec")), "{described}");
        let run = validator(doc, "/components/schemas/RunAnswer");
        assert!(run.is_valid(&json!({"exitCode": 0, "stdout": "", "stdoutTruncated": false, "leaseId": "l", "vm": "v",
                                     "outputs": [{"path": "o", "data": "aGk=", "size": "2", "omitted": false}], "timings": {"total": "1s"}})));
        assert!(!run.is_valid(&json!({"code": 0})));
        assert!(!run.is_valid(&json!({"exit": {}})));
    }
}
