//! The router's side of membership routes: loading and undoing the routing state, grants that
//! become move-ins, revocations that become move-outs, and the row keys kept per scope.

use bytes::Bytes;

use super::event::{Operation, TxMeta, change_event};
use super::membership::{ScopedRows, scope_text};
use super::{
    Binding, Change, Field, MoveIn, OldRow, RouteError, Router, Scoped, Target, check_shape,
    covers, encode_key, field_value, passes, user_ids,
};
use crate::config::Membership;

impl Router {
    /// The membership tables (and columns) the routes read, each to be loaded with
    /// [`Router::add_member`] from the snapshot the session starts at.
    pub fn memberships(&self) -> impl Iterator<Item = &Membership> {
        self.memberships.iter().map(|(m, _)| m)
    }

    /// Record one membership row (scope and user as text), as loaded from a snapshot.
    pub fn add_member(&mut self, membership: &Membership, scope: &str, user: &str) {
        if let Some((_, index)) = self.memberships.iter_mut().find(|(m, _)| m == membership) {
            index.add(scope, user);
        }
    }

    /// Distinct (scope, user) pairs and indexed row keys: the memory the routing state holds.
    pub fn index_sizes(&self) -> (usize, usize) {
        (
            self.memberships.iter().map(|(_, i)| i.len()).sum(),
            self.scoped.iter().map(|s| s.rows.len()).sum(),
        )
    }

    /// Whether changes of `relation` (as last bound) feed a membership index or row keys.
    pub fn indexes(&self, relation: u32) -> bool {
        self.bindings.get(&relation).is_some_and(Binding::indexed)
    }

    /// Index the key of a row read from a snapshot (a table routed through a membership table),
    /// without routing it.
    pub fn index_row(&mut self, relation: u32, row: Vec<Field>) -> Result<(), RouteError> {
        let Some(b) = self.bindings.get(&relation) else {
            return Err(RouteError::UnknownRelation(relation));
        };
        let change = Change::Insert { new: row };
        check_shape(b, &change)?;
        if let Target::Via { rows, .. } = b.route {
            index_rows(b, &mut self.scoped[rows].rows, &change);
        }
        Ok(())
    }

    /// While set, changes are copied rows: memberships and the user set stay as they are (the
    /// copy re-states rows the index already counts), row keys are indexed.
    pub fn set_copying(&mut self, copying: bool) {
        self.copying = copying;
    }

    /// The memberships granted since the last call, minus those revoked again since.
    pub fn take_move_ins(&mut self) -> Vec<MoveIn> {
        std::mem::take(&mut self.move_ins)
    }

    /// A TRUNCATE of `relation`: a membership table loses every member (each receives the
    /// move-out of its scopes), a table routed through one forgets its row keys.
    pub fn truncate(&mut self, relation: u32, tx: &TxMeta, emit: &mut impl FnMut(&str, &Bytes)) {
        let Some(b) = self.bindings.get(&relation) else {
            return;
        };
        if !self.copying {
            for &(index, _, _) in &b.members {
                let (membership, members) = &mut self.memberships[index];
                for (scope, user) in members.clear() {
                    let revoked = MoveIn {
                        user,
                        membership: membership.clone(),
                        scope,
                    };
                    self.move_ins.retain(|m| *m != revoked);
                    move_out(&self.scoped, index, &revoked, tx, emit);
                }
            }
        }
        if let Target::Via { rows, .. } = b.route
            && b.routed
        {
            self.scoped[rows].rows = ScopedRows::default();
        }
    }

    /// Undo what `change` did to the membership index and the row keys, without routing it:
    /// the index was loaded from a snapshot that already holds `change`, which the replication
    /// stream is about to deliver again.
    pub fn unapply(&mut self, relation: u32, change: &Change) -> Result<(), RouteError> {
        let Some(b) = self.bindings.get(&relation).filter(|b| b.indexed()) else {
            return Ok(());
        };
        check_shape(b, change)?;
        let inverse = match change {
            Change::Insert { new } => Change::Delete {
                old: OldRow {
                    fields: new.clone(),
                    full: true,
                },
            },
            Change::Delete { old } => Change::Insert {
                new: old.fields.clone(),
            },
            Change::Update {
                old: Some(old),
                new,
            } => Change::Update {
                old: Some(OldRow {
                    fields: new.clone(),
                    full: true,
                }),
                new: old.fields.clone(),
            },
            // No old row: neither the scope nor the key changed.
            Change::Update { old: None, new } => Change::Update {
                old: None,
                new: new.clone(),
            },
        };
        for &(index, scope, user) in &b.members {
            let index = &mut self.memberships[index].1;
            for_each_pair(&inverse, scope, user, |pair, add| {
                if add {
                    index.add(&pair.0, &pair.1);
                } else {
                    index.remove(&pair.0, &pair.1);
                }
            });
        }
        if let Target::Via { rows, .. } = b.route {
            index_rows(b, &mut self.scoped[rows].rows, &inverse);
        }
        Ok(())
    }
}

/// Call `f((scope, user), added)` for each membership pair a change removes, then each it adds.
pub(super) fn for_each_pair(
    change: &Change,
    scope: usize,
    user: usize,
    mut f: impl FnMut((String, String), bool),
) {
    let pair = |row: &[Field]| {
        let scope = scope_text(field_value(&row[scope]))?;
        let user = user_ids(field_value(&row[user])).next()?.into_owned();
        Some((scope, user))
    };
    let (before, after) = match change {
        Change::Insert { new } => (None, pair(new)),
        Change::Delete { old } => (pair(&old.fields), None),
        Change::Update { old, new } => match old {
            Some(old) => (pair(&old.fields), pair(new)),
            // Without an old row the identity did not change, nor (as `pgds check` requires
            // the columns in the identity) the pair.
            None => (None, None),
        },
    };
    if before == after {
        return;
    }
    if let Some(p) = before {
        f(p, false);
    }
    if let Some(p) = after {
        f(p, true);
    }
}

/// A membership ended: a `delete` to the user for every row of the scope in each table routed
/// through that membership.
pub(super) fn move_out(
    scoped: &[Scoped],
    index: usize,
    revoked: &MoveIn,
    tx: &TxMeta,
    emit: &mut impl FnMut(&str, &Bytes),
) {
    for s in scoped.iter().filter(|s| s.index == index) {
        for key in s.rows.keys(&revoked.scope) {
            let event = change_event(&s.alias, &s.schema, key, Operation::Delete, None, &[], tx);
            emit(&revoked.user, &event);
        }
    }
}

/// Keep the row keys of a table routed through a membership table in step with `change`.
pub(super) fn index_rows(b: &Binding, rows: &mut ScopedRows, change: &Change) {
    let Some(col) = b.route.column() else {
        return;
    };
    let scope = |row: &[Field]| scope_text(field_value(&row[col]));
    let mut remove = |row: &[Field]| {
        if let Some(s) = scope(row) {
            rows.remove(&s, &encode_key(b, row));
        }
    };
    match change {
        Change::Insert { .. } => {}
        Change::Delete { old } => remove(&old.fields),
        Change::Update { old, .. } => {
            if let Some(old) = old.as_ref().filter(|o| covers(b, o, col)) {
                remove(&old.fields);
            }
        }
    }
    let new = match change {
        Change::Insert { new } | Change::Update { new, .. } => new,
        Change::Delete { .. } => return,
    };
    if let Some(s) = scope(new) {
        let key = encode_key(b, new);
        if passes(b, new) {
            rows.insert(&s, &key);
        } else {
            rows.remove(&s, &key);
        }
    }
}
