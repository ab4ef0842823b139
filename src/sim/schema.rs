//! The simulator's structured answers: JSON that follows the request's
//! schema, derived from a seed (so the same input gets the same answer),
//! and the ways the simulator breaks it when told to.

use serde_json::{json, Map, Value};

const WORDS: [&str; 8] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
];

/// A value valid against `schema` (within the keywords the simulator knows:
/// type, enum, const, properties, items, anyOf/oneOf, `$ref` into
/// `$defs`/`definitions`, numeric and length bounds, common formats).
pub fn instance(schema: &Value, seed: u64) -> Value {
    gen(schema, schema, seed, 0)
}

fn pick(seed: u64, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (seed % n as u64) as usize
    }
}

fn next(seed: u64, salt: u64) -> u64 {
    (seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .rotate_left(17)
        .wrapping_mul(0x100_0000_01b3)
}

fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let path = reference.strip_prefix('#')?;
    root.pointer(path)
}

fn gen(root: &Value, s: &Value, seed: u64, depth: u32) -> Value {
    let Some(obj) = s.as_object() else {
        return json!({});
    };
    if depth > 12 {
        return Value::Null;
    }
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        if let Some(target) = resolve(root, r) {
            return gen(root, target, seed, depth + 1);
        }
    }
    if let Some(c) = obj.get("const") {
        return c.clone();
    }
    if let Some(Value::Array(options)) = obj.get("enum") {
        return options
            .get(pick(seed, options.len()))
            .cloned()
            .unwrap_or(Value::Null);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = obj.get(key) {
            if let Some(first) = subs.first() {
                return gen(root, first, seed, depth + 1);
            }
        }
    }
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.to_lowercase(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null")
            .to_lowercase(),
        _ if obj.contains_key("properties") => "object".into(),
        _ if obj.contains_key("items") => "array".into(),
        _ => "string".into(),
    };
    match ty.as_str() {
        "object" => {
            let mut out = Map::new();
            if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                for (i, (k, sub)) in props.iter().enumerate() {
                    out.insert(
                        k.clone(),
                        gen(root, sub, next(seed, i as u64 + 1), depth + 1),
                    );
                }
            }
            Value::Object(out)
        }
        "array" => {
            let min = obj.get("minItems").and_then(Value::as_u64).unwrap_or(1);
            let max = obj
                .get("maxItems")
                .and_then(Value::as_u64)
                .unwrap_or(min.max(3));
            let n = if max > min {
                min + seed % (max - min + 1)
            } else {
                min
            };
            let item = obj
                .get("items")
                .cloned()
                .unwrap_or(json!({"type": "string"}));
            Value::Array(
                (0..n)
                    .map(|i| gen(root, &item, next(seed, i + 100), depth + 1))
                    .collect(),
            )
        }
        "integer" | "number" => {
            let min = obj.get("minimum").and_then(Value::as_f64).unwrap_or(0.0);
            let max = obj
                .get("maximum")
                .and_then(Value::as_f64)
                .unwrap_or(min + 100.0);
            let span = (max - min).max(0.0);
            if ty == "integer" {
                let lo = min.ceil() as i64;
                let hi = max.floor() as i64;
                json!(lo + (seed % ((hi - lo).max(0) as u64 + 1)) as i64)
            } else {
                let share = (seed % 1000) as f64 / 1000.0;
                json!(((min + span * share) * 100.0).round() / 100.0)
            }
        }
        "boolean" => Value::Bool(seed.is_multiple_of(2)),
        "null" => Value::Null,
        _ => {
            let text = match obj.get("format").and_then(Value::as_str) {
                Some("date") => "2026-11-29".to_string(),
                Some("date-time") => "2026-11-29T06:00:00Z".to_string(),
                Some("email") => "sim@example.com".to_string(),
                Some("uri") => "https://example.com/sim".to_string(),
                _ => WORDS[pick(seed, WORDS.len())].to_string(),
            };
            let min = obj.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
            let max = obj
                .get("maxLength")
                .and_then(Value::as_u64)
                .map_or(usize::MAX, |m| m as usize);
            let mut t = text;
            while t.chars().count() < min {
                t.push('x');
            }
            Value::String(t.chars().take(max).collect())
        }
    }
}

/// `v` made invalid against `schema`: its first required property removed,
/// else a property of the wrong type added... else not an object at all.
pub fn broken(schema: &Value, v: Value) -> Value {
    let Value::Object(mut map) = v else {
        return json!("not json");
    };
    if let Some(first) = schema
        .get("required")
        .and_then(Value::as_array)
        .and_then(|r| r.first())
        .and_then(Value::as_str)
    {
        map.remove(first);
        return Value::Object(map);
    }
    if let Some((k, sub)) = schema
        .get("properties")
        .and_then(Value::as_object)
        .and_then(|p| p.iter().next())
    {
        let wrong = if sub.get("type").and_then(Value::as_str) == Some("string") {
            json!(12345)
        } else {
            json!("wrong type")
        };
        map.insert(k.clone(), wrong);
        return Value::Object(map);
    }
    json!([map])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_follow_their_schema_and_breaks_do_not() {
        let schema = json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["sentiment", "score", "tags", "when", "item"],
            "properties": {
                "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                "score": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "count": {"type": "integer", "minimum": 3, "maximum": 7},
                "tags": {"type": "array", "items": {"type": "string", "minLength": 6}, "minItems": 1, "maxItems": 3},
                "when": {"type": "string", "format": "date"},
                "item": {"$ref": "#/$defs/item"}
            },
            "$defs": {"item": {"type": "object", "required": ["sku"],
                               "properties": {"sku": {"type": "string", "maxLength": 3}}}}
        });
        for seed in 0..50 {
            let v = instance(&schema, seed);
            assert!(crate::structured::validate(&schema, &v).is_ok(), "{v}");
            let b = broken(&schema, v);
            assert!(crate::structured::validate(&schema, &b).is_err(), "{b}");
        }
        assert_eq!(instance(&schema, 7), instance(&schema, 7), "deterministic");
    }
}
