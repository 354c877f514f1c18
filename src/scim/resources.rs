//! SCIM 2.0 wire shapes (RFC 7643 core User and Group, RFC 7644 ListResponse, PatchOp and
//! Error).
//!
//! Reading is lenient, because real servers differ: unknown attributes are ignored, `active`
//! may arrive as a string, an error's `status` as a number, `Resources` may be missing from an
//! empty list. Writing is strict, because real servers reject what they do not expect: every
//! body carries its schema URN, and absent values are left out instead of being sent as `null`.
//! This module only describes data; it never performs I/O.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// Schema URN of the core User resource.
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// Schema URN of the core Group resource.
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
/// Schema URN of a list (query) response.
pub const LIST_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
/// Schema URN of a PATCH request body.
pub const PATCH_OP_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
/// Schema URN of an error body.
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
/// Schema URN of the service provider configuration resource.
pub const SERVICE_PROVIDER_CONFIG_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";

/// A core SCIM User, limited to the attributes this hub provisions. Other attributes a server
/// returns (`meta`, `groups`, extensions) are ignored when reading.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScimUser {
    /// Server-assigned identifier; `None` before creation.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub external_id: Option<String>,
    pub user_name: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub name: Option<Name>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub emails: Vec<ScimEmail>,
    #[serde(default, deserialize_with = "lenient_opt_bool")]
    pub active: Option<bool>,
}

/// The complex `name` attribute of a User.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Name {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatted: Option<String>,
}

impl Name {
    /// True when no part is set: such a name is not worth sending.
    pub fn is_empty(&self) -> bool {
        self.given_name.is_none() && self.family_name.is_none() && self.formatted.is_none()
    }
}

/// One value of the multi-valued `emails` attribute.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScimEmail {
    #[serde(default)]
    pub value: String,
    /// The `type` sub-attribute (`work`, `home`, `other`).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_opt_bool"
    )]
    pub primary: Option<bool>,
}

/// Borrowed mirror of [`ScimUser`] that adds `schemas` and leaves absent values out.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserOut<'a> {
    schemas: [&'static str; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<&'a str>,
    user_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a Name>,
    #[serde(skip_serializing_if = "<[ScimEmail]>::is_empty")]
    emails: &'a [ScimEmail],
    #[serde(skip_serializing_if = "Option::is_none")]
    active: Option<bool>,
}

impl Serialize for ScimUser {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        UserOut {
            schemas: [USER_SCHEMA],
            id: self.id.as_deref(),
            external_id: self.external_id.as_deref(),
            user_name: &self.user_name,
            display_name: self.display_name.as_deref(),
            name: self.name.as_ref().filter(|n| !n.is_empty()),
            emails: &self.emails,
            active: self.active,
        }
        .serialize(serializer)
    }
}

/// A resource type the client can list: where it lives and how its server id is read.
pub trait Resource {
    /// The endpoint under the base path (`Users`, `Groups`).
    const ENDPOINT: &'static str;
    /// The server-assigned id, if the server sent one.
    fn scim_id(&self) -> Option<&str>;
    /// The human name that identifies the resource when it has no id (userName, displayName),
    /// lower-cased.
    fn natural_key(&self) -> String;
}

impl Resource for ScimUser {
    const ENDPOINT: &'static str = "Users";
    fn scim_id(&self) -> Option<&str> {
        self.id.as_deref()
    }
    fn natural_key(&self) -> String {
        self.user_name.to_lowercase()
    }
}

/// A core SCIM Group, limited to what this hub provisions: its name, externalId and members.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScimGroup {
    /// Server-assigned identifier; `None` before creation.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub external_id: Option<String>,
    /// Required by RFC 7643, but read leniently: a group without one is still listed.
    #[serde(default, deserialize_with = "null_as_default")]
    pub display_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub members: Vec<GroupMember>,
}

impl Resource for ScimGroup {
    const ENDPOINT: &'static str = "Groups";
    fn scim_id(&self) -> Option<&str> {
        self.id.as_deref()
    }
    fn natural_key(&self) -> String {
        self.display_name.to_lowercase()
    }
}

/// One value of a Group's `members`: the member's SCIM id and, optionally, its type.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct GroupMember {
    #[serde(default, deserialize_with = "null_as_default")]
    pub value: String,
    /// `User` or `Group`; servers differ in case and in whether they send it at all.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
}

impl GroupMember {
    /// A member reference to the user with SCIM id `id`.
    pub fn user(id: &str) -> Self {
        GroupMember {
            value: id.to_string(),
            kind: Some("User".to_string()),
        }
    }
}

/// Only `value` and `type` are written: `display` and `$ref` are the server's to fill in, and
/// strict servers reject what they do not expect.
#[derive(Serialize)]
struct MemberOut<'a> {
    value: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
}

impl Serialize for GroupMember {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MemberOut {
            value: &self.value,
            kind: self.kind.as_deref(),
        }
        .serialize(serializer)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupOut<'a> {
    schemas: [&'static str; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<&'a str>,
    display_name: &'a str,
    #[serde(skip_serializing_if = "<[GroupMember]>::is_empty")]
    members: &'a [GroupMember],
}

impl Serialize for ScimGroup {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        GroupOut {
            schemas: [GROUP_SCHEMA],
            id: self.id.as_deref(),
            external_id: self.external_id.as_deref(),
            display_name: &self.display_name,
            members: &self.members,
        }
        .serialize(serializer)
    }
}

/// A query answer (RFC 7644 §3.4.2). `items_per_page` and `start_index` are optional in
/// practice, and `Resources` is omitted by some servers when the list is empty.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse<T> {
    #[serde(deserialize_with = "lenient_u64")]
    pub total_results: u64,
    #[serde(default, deserialize_with = "lenient_opt_u64")]
    pub start_index: Option<u64>,
    #[serde(default, deserialize_with = "lenient_opt_u64")]
    pub items_per_page: Option<u64>,
    #[serde(
        rename = "Resources",
        alias = "resources",
        default = "Vec::new",
        deserialize_with = "null_as_default",
        bound(deserialize = "T: Deserialize<'de>")
    )]
    pub resources: Vec<T>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListOut<'a, T> {
    schemas: [&'static str; 1],
    total_results: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_index: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    items_per_page: Option<u64>,
    #[serde(rename = "Resources")]
    resources: &'a [T],
}

impl<T: Serialize> Serialize for ListResponse<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ListOut {
            schemas: [LIST_RESPONSE_SCHEMA],
            total_results: self.total_results,
            start_index: self.start_index,
            items_per_page: self.items_per_page,
            resources: &self.resources,
        }
        .serialize(serializer)
    }
}

/// A SCIM error body (RFC 7644 §3.12). `status` is a string by the RFC but a number on some
/// servers; both are read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScimErrorBody {
    #[serde(default, deserialize_with = "string_or_number")]
    pub status: Option<String>,
    #[serde(default)]
    pub scim_type: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorOut<'a> {
    schemas: [&'static str; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scim_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

impl Serialize for ScimErrorBody {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ErrorOut {
            schemas: [ERROR_SCHEMA],
            status: self.status.as_deref(),
            scim_type: self.scim_type.as_deref(),
            detail: self.detail.as_deref(),
        }
        .serialize(serializer)
    }
}

/// The kind of one PATCH operation. Read case-insensitively (some clients send `Replace`),
/// always written in lower case as the RFC spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatchOpKind {
    Add,
    Remove,
    Replace,
}

impl PatchOpKind {
    /// The RFC spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PatchOpKind::Add => "add",
            PatchOpKind::Remove => "remove",
            PatchOpKind::Replace => "replace",
        }
    }
}

impl Serialize for PatchOpKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PatchOpKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        match raw.to_ascii_lowercase().as_str() {
            "add" => Ok(PatchOpKind::Add),
            "remove" => Ok(PatchOpKind::Remove),
            "replace" => Ok(PatchOpKind::Replace),
            _ => Err(de::Error::custom(format!(
                "unknown PATCH op `{raw}`: expected add, remove or replace"
            ))),
        }
    }
}

/// One operation of a PATCH request (RFC 7644 §3.5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchOp {
    pub op: PatchOpKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

impl PatchOp {
    /// `replace` the attribute at `path` with `value`.
    pub fn replace(path: &str, value: serde_json::Value) -> Self {
        PatchOp {
            op: PatchOpKind::Replace,
            path: Some(path.to_string()),
            value: Some(value),
        }
    }

    /// `add` `value` at `path`.
    pub fn add(path: &str, value: serde_json::Value) -> Self {
        PatchOp {
            op: PatchOpKind::Add,
            path: Some(path.to_string()),
            value: Some(value),
        }
    }

    /// `remove` the attribute at `path`.
    pub fn remove(path: &str) -> Self {
        PatchOp {
            op: PatchOpKind::Remove,
            path: Some(path.to_string()),
            value: None,
        }
    }
}

/// The body of a PATCH request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PatchRequest {
    #[serde(default)]
    pub schemas: Vec<String>,
    #[serde(rename = "Operations", alias = "operations")]
    pub operations: Vec<PatchOp>,
}

impl PatchRequest {
    /// A request carrying `operations` and the PatchOp schema URN.
    pub fn new(operations: Vec<PatchOp>) -> Self {
        PatchRequest {
            schemas: vec![PATCH_OP_SCHEMA.to_string()],
            operations,
        }
    }
}

#[derive(Serialize)]
struct PatchOut<'a> {
    schemas: [&'static str; 1],
    #[serde(rename = "Operations")]
    operations: &'a [PatchOp],
}

impl Serialize for PatchRequest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        PatchOut {
            schemas: [PATCH_OP_SCHEMA],
            operations: &self.operations,
        }
        .serialize(serializer)
    }
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Booleans as JSON booleans or as the strings `"true"` / `"false"` in any case.
fn lenient_opt_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Bool(b)) => Ok(Some(b)),
        Some(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => Err(de::Error::custom(format!(
            "expected a boolean, found {other}"
        ))),
    }
}

fn lenient_opt_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            de::Error::custom(format!("expected a non-negative integer, found {n}"))
        }),
        Some(serde_json::Value::String(s)) => s.trim().parse().map(Some).map_err(|_| {
            de::Error::custom(format!("expected a non-negative integer, found {s:?}"))
        }),
        Some(other) => Err(de::Error::custom(format!(
            "expected a non-negative integer, found {other}"
        ))),
    }
}

fn lenient_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    lenient_opt_u64(deserializer)?
        .ok_or_else(|| de::Error::custom("expected a non-negative integer, found null"))
}

fn string_or_number<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(de::Error::custom(format!(
            "expected a string or a number, found {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_serializes_schema_and_omits_absent_values() {
        let user = ScimUser {
            user_name: "alice".into(),
            name: Some(Name::default()),
            ..Default::default()
        };
        let v = serde_json::to_value(&user).unwrap();
        assert_eq!(v, json!({"schemas": [USER_SCHEMA], "userName": "alice"}));
    }

    #[test]
    fn user_reads_leniently() {
        let v = json!({
            "schemas": [USER_SCHEMA], "id": "1", "userName": "bob", "active": "False",
            "emails": null, "meta": {"resourceType": "User"}, "groups": [],
            "name": {"givenName": "Bob", "middleName": "X"}
        });
        let user: ScimUser = serde_json::from_value(v).unwrap();
        assert_eq!(user.active, Some(false));
        assert!(user.emails.is_empty());
        assert_eq!(user.name.unwrap().given_name.as_deref(), Some("Bob"));
    }

    #[test]
    fn email_type_round_trips_as_type() {
        let e = ScimEmail {
            value: "a@example.org".into(),
            kind: Some("work".into()),
            primary: Some(true),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            json!({"value": "a@example.org", "type": "work", "primary": true})
        );
        assert_eq!(serde_json::from_value::<ScimEmail>(v).unwrap(), e);
    }

    #[test]
    fn list_response_without_resources_or_items_per_page() {
        let l: ListResponse<ScimUser> =
            serde_json::from_value(json!({"totalResults": 0, "schemas": [LIST_RESPONSE_SCHEMA]}))
                .unwrap();
        assert_eq!(l.total_results, 0);
        assert!(l.resources.is_empty());
        assert_eq!(l.items_per_page, None);
        let l: ListResponse<ScimUser> =
            serde_json::from_value(json!({"totalResults": "2", "startIndex": 1, "resources": [
                {"userName": "a"}, {"userName": "b"}]}))
            .unwrap();
        assert_eq!(l.total_results, 2);
        assert_eq!(l.resources.len(), 2);
    }

    #[test]
    fn error_status_as_string_or_number() {
        let a: ScimErrorBody =
            serde_json::from_value(json!({"status": "409", "scimType": "uniqueness"})).unwrap();
        let b: ScimErrorBody = serde_json::from_value(json!({"status": 409})).unwrap();
        assert_eq!(a.status.as_deref(), Some("409"));
        assert_eq!(b.status.as_deref(), Some("409"));
        assert_eq!(a.scim_type.as_deref(), Some("uniqueness"));
    }

    #[test]
    fn group_serializes_schema_members_and_reads_leniently() {
        let g = ScimGroup {
            external_id: Some("g1".into()),
            display_name: "Eng".into(),
            members: vec![GroupMember::user("u-1")],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&g).unwrap(),
            json!({"schemas": [GROUP_SCHEMA], "externalId": "g1", "displayName": "Eng",
                "members": [{"value": "u-1", "type": "User"}]})
        );
        let empty = ScimGroup {
            display_name: "Empty".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&empty).unwrap(),
            json!({"schemas": [GROUP_SCHEMA], "displayName": "Empty"})
        );
        let read: ScimGroup = serde_json::from_value(json!({
            "id": "7", "displayName": "Ops", "members": [
                {"value": "a", "display": "Alice", "$ref": "https://x/Users/a"},
                {"value": "g", "type": "Group"}],
            "meta": {"resourceType": "Group"}}))
        .unwrap();
        assert_eq!(read.members[0].value, "a");
        assert_eq!(read.members[1].kind.as_deref(), Some("Group"));
        let bare: ScimGroup = serde_json::from_value(json!({"id": "8", "members": null})).unwrap();
        assert!(bare.members.is_empty() && bare.display_name.is_empty());
    }

    #[test]
    fn patch_request_shape() {
        let p = PatchRequest::new(vec![
            PatchOp::replace("active", json!(false)),
            PatchOp::remove("displayName"),
        ]);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"schemas": [PATCH_OP_SCHEMA], "Operations": [
                {"op": "replace", "path": "active", "value": false},
                {"op": "remove", "path": "displayName"}]})
        );
        let back: PatchRequest = serde_json::from_value(json!({"schemas": [PATCH_OP_SCHEMA],
            "Operations": [{"op": "Replace", "value": {"active": true}}]}))
        .unwrap();
        assert_eq!(back.operations[0].op, PatchOpKind::Replace);
    }
}
