//! The demo SCIM server's Groups endpoint: list (paged, filtered), create, read, PATCH and
//! delete, with the same strictness as Users.
//!
//! Members are validated when they are added (an id that is neither a user nor a group here is
//! 400 `invalidValue`), `members[value eq "…"]` removes one member and is `noTarget` when it is
//! not there, displayName is unique ignoring case (409). A PATCH answers 204 without a body, as
//! scim2-server does. Deleting a user leaves its memberships in place, as scim2-server does:
//! taking members out is the client's job.

use super::*;
use crate::scim::resources::{GroupMember, GROUP_SCHEMA};

fn group_not_found(id: &str) -> Failure {
    Failure::not_found("Group", id)
}

/// A group as it is served: members carry their `display` and `$ref`.
fn render(stored: &Stored<ScimGroup>, store: &Store, base_url: &str) -> Value {
    let g = &stored.resource;
    let id = g.id.as_deref().unwrap_or_default();
    let mut value = json!({
        "schemas": [GROUP_SCHEMA],
        "id": id,
        "displayName": g.display_name,
    });
    if let Some(ext) = &g.external_id {
        value["externalId"] = json!(ext);
    }
    if !g.members.is_empty() {
        let members: Vec<Value> = g
            .members
            .iter()
            .map(|m| {
                let mut out = json!({"value": m.value});
                let user = store.users.get(&m.value).map(|s| &s.resource);
                let kind = m
                    .kind
                    .clone()
                    .unwrap_or_else(|| if user.is_some() { "User" } else { "Group" }.into());
                let endpoint = if kind.eq_ignore_ascii_case("group") {
                    "Groups"
                } else {
                    "Users"
                };
                out["type"] = json!(kind);
                out["$ref"] = json!(format!("{base_url}/{endpoint}/{}", m.value));
                if let Some(u) = user {
                    out["display"] = json!(u.display_name.as_deref().unwrap_or(&u.user_name));
                }
                out
            })
            .collect();
        value["members"] = Value::Array(members);
    }
    value["meta"] = json!({
        "resourceType": "Group",
        "created": stored.created,
        "lastModified": stored.modified,
        "location": format!("{base_url}/Groups/{id}"),
        "version": format!("W/\"{}\"", stored.version),
    });
    value
}

pub(super) async fn list(
    State(shared): State<Arc<Shared>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let params = query_params(raw.as_deref());
    let (start, count) = page_window(&params)?;
    let filter = filter_param(&params)?;
    if let Some((FilterAttr::UserName | FilterAttr::Value, _)) = &filter {
        return Err(Failure::bad(
            "invalidFilter",
            "Groups can be filtered on displayName, externalId and id",
        ));
    }
    let base = base_url(&shared, &headers);
    let store = shared.store();
    let matches = |s: &&Stored<ScimGroup>| match &filter {
        None => true,
        Some((FilterAttr::DisplayName, v)) => {
            s.resource.display_name.to_lowercase() == v.to_lowercase()
        }
        Some((FilterAttr::ExternalId, v)) => s.resource.external_id.as_deref() == Some(v.as_str()),
        Some((FilterAttr::Id, v)) => s.resource.id.as_deref() == Some(v.as_str()),
        Some((FilterAttr::UserName | FilterAttr::Value, _)) => false,
    };
    let body = list_page(store.groups.values().filter(matches), start, count, |s| {
        render(s, &store, &base)
    });
    drop(store);
    Ok(scim_response(StatusCode::OK, &body))
}

/// The strict shape of a Group body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GroupIn {
    schemas: Vec<String>,
    /// Read-only; ignored when sent.
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<Value>,
    /// Read-only; ignored when sent.
    #[serde(default)]
    #[allow(dead_code)]
    meta: Option<Value>,
    #[serde(default)]
    external_id: Option<String>,
    display_name: String,
    #[serde(default)]
    members: Option<Vec<MemberIn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberIn {
    value: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// Read-only; ignored when sent.
    #[serde(default)]
    #[allow(dead_code)]
    display: Option<String>,
    /// Read-only; ignored when sent.
    #[serde(rename = "$ref", default)]
    #[allow(dead_code)]
    reference: Option<String>,
}

fn members_from(value: Value, store: &Store) -> Result<Vec<GroupMember>, Failure> {
    let list = match value {
        Value::Array(a) => a,
        single @ Value::Object(_) => vec![single],
        _ => return Err(Failure::bad("invalidValue", "`members` must be a list")),
    };
    list.into_iter()
        .map(|v| {
            let m: MemberIn = serde_json::from_value(v)
                .map_err(|e| Failure::bad("invalidSyntax", format!("invalid member: {e}")))?;
            member_in(m, store)
        })
        .collect()
}

fn member_in(m: MemberIn, store: &Store) -> Result<GroupMember, Failure> {
    if let Some(kind) = &m.kind {
        if !kind.eq_ignore_ascii_case("user") && !kind.eq_ignore_ascii_case("group") {
            return Err(Failure::bad(
                "invalidValue",
                format!("member type `{kind}`: expected User or Group"),
            ));
        }
    }
    if !store.users.contains(&m.value) && !store.groups.contains(&m.value) {
        return Err(Failure::bad(
            "invalidValue",
            format!("member `{}` is neither a User nor a Group here", m.value),
        ));
    }
    Ok(GroupMember {
        value: m.value,
        kind: m.kind,
    })
}

impl GroupIn {
    fn into_group(self, store: &Store) -> Result<ScimGroup, Failure> {
        if !self
            .schemas
            .iter()
            .any(|s| s.eq_ignore_ascii_case(GROUP_SCHEMA))
        {
            return Err(Failure::bad(
                "invalidSyntax",
                format!("`schemas` must contain {GROUP_SCHEMA}"),
            ));
        }
        if self.display_name.trim().is_empty() {
            return Err(Failure::bad(
                "invalidValue",
                "displayName must not be empty",
            ));
        }
        let mut members: Vec<GroupMember> = Vec::new();
        for m in self.members.unwrap_or_default() {
            let m = member_in(m, store)?;
            if !members.iter().any(|x| x.value == m.value) {
                members.push(m);
            }
        }
        Ok(ScimGroup {
            id: None,
            external_id: self.external_id,
            display_name: self.display_name,
            members,
        })
    }
}

pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    let input: GroupIn = serde_json::from_value(json_body(&body)?)
        .map_err(|e| Failure::bad("invalidSyntax", format!("invalid Group: {e}")))?;
    let base = base_url(&shared, &headers);
    let mut store = shared.store();
    let group = input.into_group(&store)?;
    let id = store
        .groups
        .insert(group)?
        .resource
        .id
        .clone()
        .unwrap_or_default();
    let stored = store.groups.get(&id).ok_or_else(|| group_not_found(&id))?;
    let body = render(stored, &store, &base);
    Ok(resource_response(StatusCode::CREATED, body, stored.version))
}

pub(super) async fn get_one(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let base = base_url(&shared, &headers);
    let store = shared.store();
    let stored = store.groups.get(&id).ok_or_else(|| group_not_found(&id))?;
    let body = render(stored, &store, &base);
    Ok(resource_response(StatusCode::OK, body, stored.version))
}

pub(super) async fn delete(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    if shared.store().groups.remove(&id) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(group_not_found(&id))
    }
}

pub(super) async fn patch(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let request: PatchRequest = serde_json::from_value(json_body(&body)?)
        .map_err(|e| Failure::bad("invalidSyntax", format!("invalid PatchOp request: {e}")))?;
    if !request
        .schemas
        .iter()
        .any(|s| s.eq_ignore_ascii_case(PATCH_OP_SCHEMA))
    {
        return Err(Failure::bad(
            "invalidSyntax",
            format!("`schemas` must contain {PATCH_OP_SCHEMA}"),
        ));
    }
    let mut store = shared.store();
    let current = store.groups.get(&id).ok_or_else(|| group_not_found(&id))?;
    // All operations apply or none does.
    let patched = apply_patch(current.resource.clone(), &request.operations, &store)?;
    store.groups.replace(&id, patched)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// What a group PATCH path names.
enum GroupPath {
    DisplayName,
    ExternalId,
    Members,
    /// `members[value eq "<id>"]`.
    Member(String),
}

fn group_path(path: &str) -> Result<GroupPath, Failure> {
    let prefix = format!("{GROUP_SCHEMA}:");
    let local = if path.len() > prefix.len() && path[..prefix.len()].eq_ignore_ascii_case(&prefix) {
        &path[prefix.len()..]
    } else {
        path
    };
    let lower = local.to_ascii_lowercase();
    if let Some(inner) = lower
        .strip_prefix("members[")
        .and_then(|_| local.get("members[".len()..))
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return match parse_filter(inner)? {
            (FilterAttr::Value, v) => Ok(GroupPath::Member(v)),
            _ => Err(Failure::bad(
                "invalidFilter",
                format!("path `{path}`: members can be selected by `value eq \"…\"` only"),
            )),
        };
    }
    match lower.as_str() {
        "displayname" => Ok(GroupPath::DisplayName),
        "externalid" => Ok(GroupPath::ExternalId),
        "members" => Ok(GroupPath::Members),
        "id" | "meta" | "schemas" => Err(Failure::bad(
            "mutability",
            format!("path `{path}`: the attribute is read-only"),
        )),
        _ => Err(Failure::bad(
            "invalidPath",
            format!("path `{path}`: unknown attribute"),
        )),
    }
}

fn string_value(value: &Value, what: &str) -> Result<String, Failure> {
    value
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::bad("invalidValue", format!("`{what}` must be a string")))
}

fn apply_patch(mut group: ScimGroup, ops: &[PatchOp], store: &Store) -> Result<ScimGroup, Failure> {
    for op in ops {
        match (&op.path, op.op) {
            (None, PatchOpKind::Remove) => {
                return Err(Failure::bad("noTarget", "a remove operation needs a path"))
            }
            (None, kind) => {
                let Some(Value::Object(values)) = &op.value else {
                    return Err(Failure::bad(
                        "invalidValue",
                        "an add or replace without a path needs an object value",
                    ));
                };
                for (key, value) in values {
                    set(&mut group, group_path(key)?, value.clone(), kind, store)?;
                }
            }
            (Some(path), PatchOpKind::Remove) => match group_path(path)? {
                GroupPath::DisplayName => {
                    return Err(Failure::bad(
                        "invalidValue",
                        "displayName is required and cannot be removed",
                    ))
                }
                GroupPath::ExternalId => group.external_id = None,
                GroupPath::Members => match &op.value {
                    // Remove the listed members (the form some clients use), or all.
                    Some(value) => {
                        let gone: Vec<String> = match value {
                            Value::Array(items) => items,
                            _ => {
                                return Err(Failure::bad("invalidValue", "`value` must be a list"))
                            }
                        }
                        .iter()
                        .filter_map(|v| v["value"].as_str().map(str::to_string))
                        .collect();
                        group.members.retain(|m| !gone.contains(&m.value));
                    }
                    None => group.members.clear(),
                },
                GroupPath::Member(id) => {
                    let before = group.members.len();
                    group.members.retain(|m| m.value != id);
                    if group.members.len() == before {
                        return Err(Failure::bad(
                            "noTarget",
                            format!("path `{path}`: no member has value `{id}`"),
                        ));
                    }
                }
            },
            (Some(path), kind) => {
                let value = op.value.clone().ok_or_else(|| {
                    Failure::bad(
                        "invalidValue",
                        format!("{} `{path}` needs a value", kind.as_str()),
                    )
                })?;
                set(&mut group, group_path(path)?, value, kind, store)?;
            }
        }
    }
    if group.display_name.trim().is_empty() {
        return Err(Failure::bad(
            "invalidValue",
            "displayName must not be empty",
        ));
    }
    Ok(group)
}

fn set(
    group: &mut ScimGroup,
    path: GroupPath,
    value: Value,
    kind: PatchOpKind,
    store: &Store,
) -> Result<(), Failure> {
    match path {
        GroupPath::DisplayName => group.display_name = string_value(&value, "displayName")?,
        GroupPath::ExternalId => group.external_id = Some(string_value(&value, "externalId")?),
        GroupPath::Members => {
            let members = members_from(value, store)?;
            if kind == PatchOpKind::Replace {
                group.members.clear();
            }
            for m in members {
                if !group.members.iter().any(|x| x.value == m.value) {
                    group.members.push(m);
                }
            }
        }
        GroupPath::Member(_) => {
            return Err(Failure::bad(
                "invalidPath",
                "a `members[value eq …]` path can only be removed here",
            ))
        }
    }
    Ok(())
}
