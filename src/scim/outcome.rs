//! The record of what one synchronisation did to each resource: one [`ResourceOp`] per
//! operation the plan asked for, in plan order, whatever became of it.
//!
//! Plain, serialisable data so the hub can keep a per-resource history (DESIGN §6, step 5). It
//! must never hold a secret: ids, names, counts and the administrator-facing line of a failure.

use serde::{Deserialize, Serialize};

/// Which kind of SCIM resource an operation touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    User,
    Group,
}

/// What the operation set out to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// POST of a new resource.
    Create,
    /// An existing resource taken over (matched, or found after a 409 / a lost answer).
    Adopt,
    /// PATCH of attributes (for groups: displayName / externalId).
    Update,
    /// PATCH `active=false` of a user no longer granted.
    Deactivate,
    /// DELETE of a resource no longer granted.
    Delete,
    /// PATCH `add` of group members.
    AddMembers,
    /// PATCH `remove` of group members.
    RemoveMembers,
}

/// How the operation ended. In JSON (the admin API, the stored history) it is the record's
/// `outcome` field — `done`, `already_gone`, `failed` (with `message`) or `skipped`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum OpResult {
    #[serde(rename = "done")]
    Ok,
    /// A delete or deactivate found the resource already gone (404): nothing left to do.
    AlreadyGone,
    /// The server refused or did not answer; `message` is the one actionable line.
    Failed { message: String },
    /// Skipped because an earlier operation failed in a way every other one would too.
    #[serde(rename = "skipped")]
    NotAttempted,
}

/// One operation of a run on one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceOp {
    #[serde(rename = "action")]
    pub kind: OpKind,
    pub resource: ResourceKind,
    /// The SCIM id, when known (a create that failed has none).
    #[serde(rename = "scim_id")]
    pub id: Option<String>,
    /// The hub's id for the resource (its SCIM `externalId`), when known.
    pub external_id: Option<String>,
    /// userName or displayName, for people reading the history.
    pub name: String,
    /// For member operations, how many members the operation carried; else 0.
    pub members: usize,
    #[serde(flatten)]
    pub result: OpResult,
}

impl ResourceOp {
    /// True when the operation did what it set out to do (or found it already done).
    pub fn succeeded(&self) -> bool {
        matches!(self.result, OpResult::Ok | OpResult::AlreadyGone)
    }
}

impl OpResult {
    /// The `outcome` word of the JSON form, e.g. for an index on it.
    pub fn name(&self) -> &'static str {
        match self {
            OpResult::Ok => "done",
            OpResult::AlreadyGone => "already_gone",
            OpResult::Failed { .. } => "failed",
            OpResult::NotAttempted => "skipped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_form_is_flat_and_round_trips() {
        let op = ResourceOp {
            kind: OpKind::RemoveMembers,
            resource: ResourceKind::Group,
            id: Some("g-1".into()),
            external_id: Some("eng".into()),
            name: "Engineering".into(),
            members: 3,
            result: OpResult::Failed {
                message: "forbidden (403)".into(),
            },
        };
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "action": "remove_members", "resource": "group", "scim_id": "g-1",
                "external_id": "eng", "name": "Engineering", "members": 3,
                "outcome": "failed", "message": "forbidden (403)"
            })
        );
        assert_eq!(serde_json::from_value::<ResourceOp>(json).unwrap(), op);
        for result in [
            OpResult::Ok,
            OpResult::AlreadyGone,
            OpResult::Failed {
                message: "x".into(),
            },
            OpResult::NotAttempted,
        ] {
            let name = result.name();
            let op = ResourceOp {
                result,
                ..op.clone()
            };
            assert_eq!(serde_json::to_value(&op).unwrap()["outcome"], name);
            assert_eq!(
                serde_json::from_value::<ResourceOp>(serde_json::to_value(&op).unwrap()).unwrap(),
                op
            );
        }
    }
}
