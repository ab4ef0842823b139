//! Structured outputs (pure): a job's `response_format`, what each provider
//! can honour of it, and whether an answer follows it.
//!
//! A job (or its category) asks for JSON: `{"type": "json_object"}`, or
//! `{"type": "json_schema", "name", "schema", "strict"}`. The adapters send
//! it in their provider's native form (OpenAI `response_format`, Anthropic
//! `output_config.format` or one forced tool, Gemini
//! `generationConfig.responseJsonSchema` / `responseSchema`); every answer
//! is then validated here with the `jsonschema` crate, whatever the provider
//! promised. What a provider cannot honour is refused before any call: at
//! config load for a category's format, at dispatch for a job's own.
//!
//! Schemas resolve no external `$ref` (the crate is built without HTTP and
//! file resolvers): a job cannot make a worker fetch anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ProviderKind, StructuredMode};

/// What a job asks its answer to be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject {},
    /// JSON valid against `schema`.
    JsonSchema {
        /// 1–64 characters of `[A-Za-z0-9_-]` (OpenAI's rule).
        name: String,
        schema: Value,
        /// Ask the provider to enforce the schema while generating (OpenAI
        /// strict mode: every object closed, every property required).
        #[serde(default = "yes")]
        strict: bool,
    },
}

fn yes() -> bool {
    true
}

/// Keywords a strict OpenAI schema may not use.
const OPENAI_STRICT_UNSUPPORTED: &[&str] = &[
    "allOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "dependentRequired",
    "dependentSchemas",
    "unevaluatedProperties",
];

/// Keywords Gemini's `responseSchema` (an OpenAPI subset) takes; a schema
/// with others is sent as `responseJsonSchema`.
const GEMINI_OPENAPI_KEYS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "items",
    "properties",
    "required",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "anyOf",
    "propertyOrdering",
    "additionalProperties",
];

impl ResponseFormat {
    /// Why this format is unusable whatever the provider, if it is.
    pub fn validate(&self) -> Result<(), String> {
        let ResponseFormat::JsonSchema { name, schema, .. } = self else {
            return Ok(());
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "name `{name}`: 1-64 characters of letters, digits, `_` and `-`"
            ));
        }
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(
                "schema: the top level must be `\"type\": \"object\"` (every provider's \
                 structured output answers an object)"
                    .into(),
            );
        }
        compiled(schema).map(|_| ())
    }

    /// The schema an answer must follow (`{"type": "object"}` for a
    /// `json_object` format).
    pub fn schema(&self) -> Value {
        match self {
            ResponseFormat::JsonObject {} => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema { schema, .. } => schema.clone(),
        }
    }

    /// The format's name (`json_object` has none of its own).
    pub fn name(&self) -> &str {
        match self {
            ResponseFormat::JsonObject {} => "json_object",
            ResponseFormat::JsonSchema { name, .. } => name,
        }
    }

    /// Why a model of provider `kind` served in `mode` cannot honour this
    /// format, if it cannot.
    pub fn unsupported(&self, kind: ProviderKind, mode: StructuredMode) -> Option<String> {
        if mode == StructuredMode::None {
            return Some(
                "the model produces no structured output (structured_output = \"none\")".into(),
            );
        }
        match (self, kind) {
            (
                ResponseFormat::JsonSchema {
                    schema,
                    strict: true,
                    ..
                },
                ProviderKind::Openai | ProviderKind::OpenaiCompatible,
            ) => openai_strict_problem(schema, "$").map(|p| {
                format!("OpenAI strict mode cannot take this schema: {p} (or set `strict = false`)")
            }),
            _ => None,
        }
    }
}

/// The first place a schema breaks OpenAI's strict-mode rules.
fn openai_strict_problem(s: &Value, at: &str) -> Option<String> {
    let obj = s.as_object()?;
    if let Some(k) = OPENAI_STRICT_UNSUPPORTED
        .iter()
        .find(|k| obj.contains_key(**k))
    {
        return Some(format!("{at} uses `{k}`"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        if obj.get("additionalProperties") != Some(&Value::Bool(false)) {
            return Some(format!("{at} must set `additionalProperties: false`"));
        }
        let required: Vec<&str> = obj
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(missing) = props.keys().find(|k| !required.contains(&k.as_str())) {
            return Some(format!("{at} must list `{missing}` in `required`"));
        }
        for (k, sub) in props {
            if let Some(p) = openai_strict_problem(sub, &format!("{at}.{k}")) {
                return Some(p);
            }
        }
    }
    for key in ["items", "$defs", "definitions", "anyOf"] {
        match obj.get(key) {
            Some(Value::Array(subs)) => {
                for (i, sub) in subs.iter().enumerate() {
                    if let Some(p) = openai_strict_problem(sub, &format!("{at}.{key}[{i}]")) {
                        return Some(p);
                    }
                }
            }
            Some(Value::Object(m)) if key != "items" => {
                for (k, sub) in m {
                    if let Some(p) = openai_strict_problem(sub, &format!("{at}.{key}.{k}")) {
                        return Some(p);
                    }
                }
            }
            Some(sub @ Value::Object(_)) => {
                if let Some(p) = openai_strict_problem(sub, &format!("{at}.items")) {
                    return Some(p);
                }
            }
            _ => {}
        }
    }
    None
}

/// `schema` as Gemini's `responseSchema` (its OpenAPI subset): type lists
/// with `null` become `nullable`, `additionalProperties` goes (the answer
/// is validated anyway). `None` if it uses anything else (`$ref`, `allOf`,
/// …): then it is sent as `responseJsonSchema`.
pub fn gemini_openapi_schema(schema: &Value) -> Option<Value> {
    let obj = schema.as_object()?;
    let mut out = serde_json::Map::new();
    for (k, v) in obj {
        if !GEMINI_OPENAPI_KEYS.contains(&k.as_str()) {
            return None;
        }
        match k.as_str() {
            "additionalProperties" => {}
            "type" => match v {
                Value::String(_) => {
                    out.insert(k.clone(), v.clone());
                }
                Value::Array(ts) => {
                    let others: Vec<&Value> = ts.iter().filter(|t| *t != "null").collect();
                    if others.len() != 1 {
                        return None;
                    }
                    out.insert("type".into(), others[0].clone());
                    if others.len() < ts.len() {
                        out.insert("nullable".into(), Value::Bool(true));
                    }
                }
                _ => return None,
            },
            "properties" => {
                let mut props = serde_json::Map::new();
                for (name, sub) in v.as_object()? {
                    props.insert(name.clone(), gemini_openapi_schema(sub)?);
                }
                out.insert(k.clone(), Value::Object(props));
            }
            "items" => {
                out.insert(k.clone(), gemini_openapi_schema(v)?);
            }
            "anyOf" => {
                let subs = v
                    .as_array()?
                    .iter()
                    .map(gemini_openapi_schema)
                    .collect::<Option<Vec<_>>>()?;
                out.insert(k.clone(), Value::Array(subs));
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Some(Value::Object(out))
}

type Compiled = Arc<jsonschema::Validator>;

/// Compiled validators by schema text: schemas repeat (a category's, a
/// pipeline's), compiling is the expensive part. Bounded: cleared when full.
fn compiled(schema: &Value) -> Result<Compiled, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Compiled>>> = OnceLock::new();
    let key = schema.to_string();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(v);
    }
    let v = Arc::new(
        jsonschema::validator_for(schema).map_err(|e| format!("schema is not valid: {e}"))?,
    );
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 512 {
            c.clear();
        }
        c.insert(key, v.clone());
    }
    Ok(v)
}

/// Why `schema` is not a usable JSON Schema, if it is not.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    compiled(schema).map(|_| ())
}

/// The JSON in an answer: the whole text, or the first fenced or braced
/// JSON value in it.
pub fn parse_answer(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Some(v);
    }
    crate::route::extract_json(t)
}

/// Validate `v` against `schema`: the first errors, with where they are.
pub fn validate(schema: &Value, v: &Value) -> Result<(), String> {
    let validator = compiled(schema)?;
    let errors: Vec<String> = validator
        .iter_errors(v)
        .take(3)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("at {at}: {e}")
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The answer's JSON if it follows `format`, else why not.
pub fn check_answer(format: &ResponseFormat, text: &str) -> Result<Value, String> {
    let v = parse_answer(text).ok_or_else(|| {
        let shown: String = text.chars().take(80).collect();
        format!("the answer is not JSON: `{shown}`")
    })?;
    validate(&format.schema(), &v).map(|()| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sentiment() -> ResponseFormat {
        ResponseFormat::JsonSchema {
            name: "sentiment".into(),
            strict: true,
            schema: json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["sentiment", "score"],
                "properties": {
                    "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                    "score": {"type": ["number", "null"], "minimum": 0, "maximum": 1}
                }
            }),
        }
    }

    #[test]
    fn formats_read_as_the_envelope_writes_them() {
        let f: ResponseFormat = serde_json::from_value(json!({
            "type": "json_schema", "name": "x", "schema": {"type": "object"}}))
        .unwrap();
        assert!(matches!(f, ResponseFormat::JsonSchema { strict: true, .. }));
        let o: ResponseFormat = serde_json::from_value(json!({"type": "json_object"})).unwrap();
        assert_eq!(o, ResponseFormat::JsonObject {});
        for bad in [
            json!({"type": "xml"}),
            json!({"type": "json_schema", "name": "x"}),
            json!({"type": "json_object", "schema": {}}),
        ] {
            assert!(
                serde_json::from_value::<ResponseFormat>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn unusable_formats_are_refused_with_the_reason() {
        assert!(sentiment().validate().is_ok());
        let bad = |name: &str, schema: Value| ResponseFormat::JsonSchema {
            name: name.into(),
            schema,
            strict: false,
        };
        let e = bad("has space", json!({"type": "object"}))
            .validate()
            .unwrap_err();
        assert!(e.contains("name"), "{e}");
        let e = bad("x", json!({"type": "array"})).validate().unwrap_err();
        assert!(e.contains("top level"), "{e}");
        let e = bad(
            "x",
            json!({"type": "object", "properties": {"a": {"type": 5}}}),
        )
        .validate()
        .unwrap_err();
        assert!(e.contains("schema is not valid"), "{e}");
        let e = bad(
            "x",
            json!({"type": "object", "$ref": "https://example.com/s.json"}),
        )
        .validate()
        .unwrap_err();
        assert!(e.contains("schema is not valid"), "no remote refs: {e}");
    }

    #[test]
    fn answers_are_checked_against_the_schema() {
        let f = sentiment();
        let v = check_answer(&f, r#"{"sentiment": "positive", "score": 0.9}"#).unwrap();
        assert_eq!(v["sentiment"], "positive");
        assert!(check_answer(
            &f,
            "```json\n{\"sentiment\": \"neutral\", \"score\": null}\n```"
        )
        .is_ok());
        let e = check_answer(&f, r#"{"sentiment": "happy", "score": 2}"#).unwrap_err();
        assert!(e.contains("/sentiment") && e.contains("/score"), "{e}");
        let e = check_answer(&f, r#"{"sentiment": "neutral"}"#).unwrap_err();
        assert!(e.contains("score"), "{e}");
        let e = check_answer(&f, "I think it is positive").unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        assert!(check_answer(&ResponseFormat::JsonObject {}, "[1]").is_err());
        assert!(check_answer(&ResponseFormat::JsonObject {}, "{\"a\": 1}").is_ok());
    }

    #[test]
    fn providers_say_what_they_cannot_honour() {
        use ProviderKind::{Anthropic, Gemini, Openai};
        use StructuredMode::Native;
        assert_eq!(sentiment().unsupported(Openai, Native), None);
        let open = ResponseFormat::JsonSchema {
            name: "x".into(),
            strict: true,
            schema: json!({"type": "object", "properties": {"a": {"type": "string"}}}),
        };
        let e = open.unsupported(Openai, Native).unwrap();
        assert!(
            e.contains("additionalProperties") && e.contains("strict = false"),
            "{e}"
        );
        assert_eq!(open.unsupported(Anthropic, Native), None);
        assert_eq!(open.unsupported(Gemini, Native), None);
        let lax = ResponseFormat::JsonSchema {
            name: "x".into(),
            strict: false,
            schema: json!({"type": "object", "properties": {"a": {"type": "string"}}}),
        };
        assert_eq!(lax.unsupported(Openai, Native), None);
        let partial = ResponseFormat::JsonSchema {
            name: "x".into(),
            strict: true,
            schema: json!({"type": "object", "additionalProperties": false,
                           "required": ["a"], "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}),
        };
        assert!(partial.unsupported(Openai, Native).unwrap().contains("`b`"));
        assert!(sentiment()
            .unsupported(Anthropic, StructuredMode::None)
            .is_some());
    }

    #[test]
    fn gemini_gets_its_openapi_subset_where_the_schema_fits() {
        let s = gemini_openapi_schema(&sentiment().schema()).unwrap();
        assert_eq!(s["properties"]["score"]["type"], "number");
        assert_eq!(s["properties"]["score"]["nullable"], true);
        assert!(s.get("additionalProperties").is_none());
        assert_eq!(
            gemini_openapi_schema(&json!({"type": "object", "$defs": {}, "properties": {}})),
            None
        );
    }
}
