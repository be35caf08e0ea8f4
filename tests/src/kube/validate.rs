//! The API server's validation of the Node and Pod fields nth and the tests write, with the
//! real server's field paths and wording (kube-apiserver v1.28.4; note that it reports node
//! taints under `metadata.taints`, not `spec.taints`).

use serde_json::Value;

use super::status::{ApiError, FieldError};

const NAME_PART_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const PREFIX_MSG: &str = "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const TAINT_EFFECTS: &[&str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];
/// The most bytes all of an object's annotations may take together.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

fn invalid(field: &str, value: &str, why: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason: "FieldValueInvalid",
        message: format!("Invalid value: {value:?}: {why}"),
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, the body of names and label values.
fn is_label_token(s: &str) -> bool {
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

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b.first().is_some_and(u8::is_ascii_alphanumeric)
                && b.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

/// A qualified name (label, annotation and taint keys): `[prefix/]name`.
fn qualified_name(field: &str, key: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push(invalid(field, key, "prefix part must be non-empty"));
            } else if !is_dns_subdomain(prefix) {
                errors.push(invalid(field, key, PREFIX_MSG));
            }
            name
        }
        _ => {
            errors.push(invalid(field, key, "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"));
            return errors;
        }
    };
    if name.is_empty() {
        errors.push(invalid(field, key, "name part must be non-empty"));
    } else if name.len() > 63 {
        errors.push(invalid(
            field,
            key,
            "name part must be no more than 63 characters",
        ));
    }
    if !is_label_token(name) {
        errors.push(invalid(field, key, NAME_PART_MSG));
    }
    errors
}

fn label_value(field: &str, value: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if value.len() > 63 {
        errors.push(invalid(field, value, "must be no more than 63 characters"));
    }
    if !value.is_empty() && !is_label_token(value) {
        errors.push(invalid(field, value, LABEL_VALUE_MSG));
    }
    errors
}

/// Labels and annotations, which every object has.
fn metadata(obj: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            errors.extend(qualified_name("metadata.labels", k));
            errors.extend(label_value(
                "metadata.labels",
                v.as_str().unwrap_or_default(),
            ));
        }
    }
    if let Some(annotations) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut bytes = 0;
        for (k, v) in annotations {
            errors.extend(qualified_name("metadata.annotations", k));
            bytes += k.len() + v.as_str().map_or(0, str::len);
        }
        if bytes > ANNOTATIONS_MAX_BYTES {
            errors.push(FieldError {
                field: "metadata.annotations".into(),
                reason: "FieldValueTooLong",
                message: format!("Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes"),
            });
        }
    }
    errors
}

/// Types the real server checks while decoding, before validation: a wrong one is a 422
/// about the patch (or a 400 for a PUT, which `write` decides).
pub fn types(obj: &Value) -> Result<(), String> {
    for map in ["/metadata/labels", "/metadata/annotations"] {
        if let Some((k, v)) = obj
            .pointer(map)
            .and_then(Value::as_object)
            .and_then(|m| m.iter().find(|(_, v)| !v.is_string()))
        {
            return Err(format!(
                "{map}/{k}: cannot convert {} to string",
                type_name(v)
            ));
        }
    }
    if let Some(u) = obj
        .pointer("/spec/unschedulable")
        .filter(|u| !u.is_boolean())
    {
        return Err(format!(
            "spec.unschedulable: unrecognized type: bool ({})",
            type_name(u)
        ));
    }
    if let Some(taints) = obj.pointer("/spec/taints") {
        let list = taints
            .as_array()
            .ok_or("spec.taints: unrecognized type: array")?;
        for taint in list {
            if !taint.is_object() {
                return Err("spec.taints[]: unrecognized type: object".into());
            }
            for field in ["key", "value", "effect"] {
                if taint.get(field).is_some_and(|v| !v.is_string()) {
                    return Err(format!("spec.taints[].{field}: unrecognized type: string"));
                }
            }
        }
    }
    Ok(())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nil",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int64",
        Value::Number(_) => "float64",
        Value::String(_) => "string",
        Value::Array(_) => "slice",
        Value::Object(_) => "map",
    }
}

/// What a stored node looks like after decoding: unknown taint fields (a `$patch` inside an
/// atomic list among them) are dropped, and an empty taint list is no list (omitempty).
pub fn normalise_node(node: &mut Value) {
    let Some(spec) = node.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(Value::Array(taints)) = spec.get_mut("taints") {
        for taint in taints.iter_mut() {
            if let Some(t) = taint.as_object_mut() {
                t.retain(|k, _| matches!(k.as_str(), "key" | "value" | "effect" | "timeAdded"));
            }
        }
    }
    if spec
        .get("taints")
        .is_some_and(|t| t.is_null() || t.as_array().is_some_and(Vec::is_empty))
    {
        spec.remove("taints");
    }
}

/// ValidateNode and ValidateNodeUpdate for the fields nth writes.
pub fn node(old: &Value, new: &Value) -> Result<(), ApiError> {
    let name = new["metadata"]["name"].as_str().unwrap_or_default();
    let mut errors = metadata(new);
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for (i, taint) in new
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("metadata.taints[{i}]");
        let key = taint["key"].as_str().unwrap_or_default();
        errors.extend(qualified_name(&format!("{field}.key"), key));
        let value = taint["value"].as_str().unwrap_or_default();
        errors.extend(label_value(&format!("{field}.value"), value));
        let effect = taint["effect"].as_str().unwrap_or_default();
        if effect.is_empty() {
            errors.push(FieldError {
                field: format!("{field}.effect"),
                reason: "FieldValueRequired",
                message: "Required value".into(),
            });
        } else if !TAINT_EFFECTS.contains(&effect) {
            errors.push(FieldError {
                field: format!("{field}.effect"),
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {effect:?}: supported values: \"NoSchedule\", \"PreferNoSchedule\", \"NoExecute\""
                ),
            });
        }
        if seen.contains(&(key, effect)) {
            let added = if taint.get("timeAdded").is_some_and(|t| !t.is_null()) {
                "<set>"
            } else {
                "<nil>"
            };
            errors.push(FieldError {
                field: field.clone(),
                reason: "FieldValueDuplicate",
                message: format!(
                    "Duplicate value: core.Taint{{Key:{key:?}, Value:{value:?}, Effect:{effect:?}, TimeAdded:{added}}}: taints must be unique by key and effect pair"
                ),
            });
        }
        seen.push((key, effect));
    }
    let old_provider = old
        .pointer("/spec/providerID")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let new_provider = new
        .pointer("/spec/providerID")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !old_provider.is_empty() && old_provider != new_provider {
        errors.push(FieldError {
            field: "spec.providerID".into(),
            reason: "FieldValueForbidden",
            message: "Forbidden: node updates may not change providerID except from \"\" to valid"
                .into(),
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_object("Node", name, &errors))
    }
}

/// A pod's spec with the fields an update may change blanked out.
fn pod_spec_frozen(spec: &Value) -> Value {
    let mut spec = spec.clone();
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(containers)) = spec.get_mut(list) {
            for c in containers.iter_mut().filter_map(Value::as_object_mut) {
                c.remove("image");
            }
        }
    }
    if let Some(s) = spec.as_object_mut() {
        for field in [
            "activeDeadlineSeconds",
            "tolerations",
            "terminationGracePeriodSeconds",
        ] {
            s.remove(field);
        }
    }
    spec
}

/// ValidatePodUpdate, for the spec: only images, activeDeadlineSeconds, added tolerations and
/// terminationGracePeriodSeconds may change. The real message also prints a diff; this one
/// stops before it.
pub fn pod(old: &Value, new: &Value) -> Result<(), ApiError> {
    let name = new["metadata"]["name"].as_str().unwrap_or_default();
    let mut errors = metadata(new);
    let count = |v: &Value| {
        v.pointer("/spec/containers")
            .and_then(Value::as_array)
            .map(Vec::len)
    };
    let tolerations = |v: &Value| {
        v.pointer("/spec/tolerations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (old_tol, new_tol) = (tolerations(old), tolerations(new));
    if count(old) != count(new) {
        errors.push(FieldError {
            field: "spec.containers".into(),
            reason: "FieldValueForbidden",
            message: "Forbidden: pod updates may not add or remove containers".into(),
        });
    } else if pod_spec_frozen(&old["spec"]) != pod_spec_frozen(&new["spec"])
        || !old_tol.iter().all(|t| new_tol.contains(t))
    {
        errors.push(FieldError {
            field: "spec".into(),
            reason: "FieldValueForbidden",
            message: "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".into(),
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_object("Pod", name, &errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_taint_without_an_effect_is_refused_in_the_real_servers_words() {
        let node = json!({"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "nth"}]}});
        let err = super::node(&node, &node).expect_err("422");
        assert_eq!(
            err.message,
            "Node \"n1\" is invalid: metadata.taints[0].effect: Required value"
        );
    }

    #[test]
    fn qualified_names_take_an_optional_dns_prefix() {
        assert!(qualified_name("f", "nth.example.com/kind").is_empty());
        assert!(qualified_name(
            "f",
            "node.kubernetes.io/exclude-from-external-load-balancers"
        )
        .is_empty());
        assert_eq!(qualified_name("f", "bad key").len(), 1);
        assert_eq!(qualified_name("f", "").len(), 2);
        assert_eq!(qualified_name("f", "Upper.Case/x").len(), 1);
    }
}
