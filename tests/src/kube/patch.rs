//! PATCH bodies: JSON merge patch (RFC 7386) and strategic merge patch as the API server
//! applies it to nodes (lists merged by their patchMergeKey, `$patch: delete` honoured).

use serde_json::{Map, Value};

use super::status::ApiError;

/// RFC 7386: objects merge, `null` deletes, everything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(target_map) = target.as_object_mut() {
        for (k, v) in patch_map {
            if v.is_null() {
                target_map.remove(k);
            } else {
                merge(target_map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// The merge key of the lists a node has, from the Kubernetes API's strategic-merge
/// metadata (`patchMergeKey`); lists without one are replaced whole.
fn merge_key(path: &[&str]) -> Option<&'static str> {
    match path {
        ["spec", "taints"] => Some("key"),
        ["status", "conditions"] => Some("type"),
        ["status", "addresses"] => Some("type"),
        _ => None,
    }
}

pub fn strategic(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    strategic_at(target, patch, &mut Vec::new())
}

fn strategic_at<'a>(
    target: &mut Value,
    patch: &'a Value,
    path: &mut Vec<&'a str>,
) -> Result<(), ApiError> {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return Ok(());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(target_map) = target.as_object_mut() else {
        return Ok(());
    };
    for (k, v) in patch_map {
        if k.starts_with("$setElementOrder") || k.starts_with("$retainKeys") {
            continue;
        }
        path.push(k);
        if v.is_null() {
            target_map.remove(k);
        } else if let (Some(key), Some(items)) = (merge_key(path), v.as_array()) {
            let existing = target_map
                .entry(k.clone())
                .or_insert(Value::Array(Vec::new()));
            merge_list(existing, items, key)?;
        } else if v.is_object() {
            strategic_at(target_map.entry(k.clone()).or_insert(Value::Null), v, path)?;
        } else {
            target_map.insert(k.clone(), v.clone());
        }
        path.pop();
    }
    Ok(())
}

fn merge_list(existing: &mut Value, items: &[Value], key: &str) -> Result<(), ApiError> {
    if !existing.is_array() {
        *existing = Value::Array(Vec::new());
    }
    let Some(list) = existing.as_array_mut() else {
        return Ok(());
    };
    for item in items {
        let id = item.get(key).cloned().ok_or_else(|| {
            ApiError::bad_request(format!(
                "strategic merge patch: list item without merge key {key:?}"
            ))
        })?;
        let position = list.iter().position(|e| e.get(key) == Some(&id));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = position {
                list.remove(i);
            }
            continue;
        }
        match position {
            Some(i) => merge(&mut list[i], item),
            None => list.push(item.clone()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn taints_merge_by_key_keeping_others() {
        let mut node = json!({"spec": {"taints": [{"key": "a", "effect": "NoSchedule"}]}});
        strategic(&mut node, &json!({"spec": {"unschedulable": true, "taints": [{"key": "b", "effect": "NoSchedule"}]}}))
            .expect("valid");
        assert_eq!(node["spec"]["taints"].as_array().map(Vec::len), Some(2));
        assert_eq!(node["spec"]["unschedulable"], true);
        strategic(
            &mut node,
            &json!({"spec": {"taints": [{"key": "a", "$patch": "delete"}]}}),
        )
        .expect("valid");
        assert_eq!(
            node["spec"]["taints"],
            json!([{"key": "b", "effect": "NoSchedule"}])
        );
    }

    #[test]
    fn merge_patch_replaces_lists_and_deletes_nulls() {
        let mut node = json!({"metadata": {"annotations": {"x": "1", "y": "2"}}, "spec": {"taints": [{"key": "a"}]}});
        merge(
            &mut node,
            &json!({"metadata": {"annotations": {"x": null}}, "spec": {"taints": [{"key": "b"}]}}),
        );
        assert_eq!(
            node,
            json!({"metadata": {"annotations": {"y": "2"}}, "spec": {"taints": [{"key": "b"}]}})
        );
    }
}
