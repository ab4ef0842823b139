//! A small JSON Schema subset for checking model answers (pure): `type`
//! (string, number, integer, boolean, object, array, null, or a list of
//! them), `properties`, `required`, `additionalProperties: false`, `enum`,
//! `items`, `minimum`, `maximum`, `minLength`, `maxLength`, `minItems`,
//! `maxItems`. Unknown keywords are ignored, as JSON Schema does.

use serde_json::Value;

/// Validate `v` against `schema`; the error names the path that failed.
pub fn validate(schema: &Value, v: &Value) -> Result<(), String> {
    at(schema, v, "$")
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "null" => v.is_null(),
        _ => true,
    }
}

fn at(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    let Some(s) = schema.as_object() else {
        return Ok(());
    };
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => return Err(format!("{path}: expected {t}")),
        Some(Value::Array(ts)) if !ts.iter().filter_map(|t| t.as_str()).any(|t| type_ok(t, v)) => {
            return Err(format!(
                "{path}: expected one of {}",
                Value::Array(ts.clone())
            ))
        }
        _ => {}
    }
    if let Some(Value::Array(allowed)) = s.get("enum") {
        if !allowed.contains(v) {
            return Err(format!(
                "{path}: {v} is not one of {}",
                Value::Array(allowed.clone())
            ));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if n < min {
                return Err(format!("{path}: {n} is below {min}"));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if n > max {
                return Err(format!("{path}: {n} is above {max}"));
            }
        }
    }
    if let Some(text) = v.as_str() {
        let len = text.chars().count() as u64;
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            if len < min {
                return Err(format!("{path}: shorter than {min} characters"));
            }
        }
        if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
            if len > max {
                return Err(format!("{path}: longer than {max} characters"));
            }
        }
    }
    if let Some(obj) = v.as_object() {
        if let Some(Value::Array(req)) = s.get("required") {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    return Err(format!("{path}: missing required `{r}`"));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => at(sub, val, &format!("{path}.{k}"))?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{path}: unexpected property `{k}`"))
                }
                None => {}
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if n < min {
                return Err(format!("{path}: fewer than {min} items"));
            }
        }
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
            if n > max {
                return Err(format!("{path}: more than {max} items"));
            }
        }
        if let Some(sub) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                at(sub, item, &format!("{path}[{i}]"))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_the_subset() {
        let schema = json!({
            "type": "object",
            "required": ["sentiment", "score"],
            "additionalProperties": false,
            "properties": {
                "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "tags": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 3}
            }
        });
        assert!(validate(&schema, &json!({"sentiment": "positive", "score": 0.9})).is_ok());
        assert!(validate(
            &schema,
            &json!({"sentiment": "positive", "score": 0.9, "tags": ["a"]})
        )
        .is_ok());
        let bad = [
            (json!({"sentiment": "positive"}), "missing required `score`"),
            (json!({"sentiment": "happy", "score": 0.5}), "is not one of"),
            (json!({"sentiment": "neutral", "score": 3}), "above 1"),
            (
                json!({"sentiment": "neutral", "score": "x"}),
                "expected number",
            ),
            (
                json!({"sentiment": "neutral", "score": 0, "extra": 1}),
                "unexpected property",
            ),
            (
                json!({"sentiment": "neutral", "score": 0, "tags": [""]}),
                "$.tags[0]",
            ),
            (json!([1, 2]), "expected object"),
        ];
        for (v, want) in bad {
            let e = validate(&schema, &v).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
        assert!(validate(&json!({"type": ["string", "null"]}), &Value::Null).is_ok());
        assert!(validate(&json!({"type": "integer"}), &json!(2.5)).is_err());
    }
}
