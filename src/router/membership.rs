//! Routing state that follows membership tables: who belongs to each scope, and which rows of
//! each table routed through a membership table are in each scope.
//!
//! Both are values the router owns and updates from the replication stream, in commit order, so
//! a change is routed with the memberships of its own position in the stream. Lookups are hash
//! lookups: the cost of routing a change does not grow with the number of users or scopes.
//!
//! Memory: one entry per distinct (scope, user) pair of each membership table, and one entry per
//! published row of each table routed through one (its key and scope as text): about
//! 100 bytes + the key's length per row. The row keys are what a revoked membership needs: the
//! user receives a `delete` for every row of the scope it had, without a query.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// The members of every scope of one membership table. A pair listed by several rows (the table
/// need not have a unique constraint) counts once per row: the membership ends with the last.
#[derive(Debug, Default)]
pub struct MembershipIndex {
    scopes: HashMap<String, HashMap<String, u32>>,
    /// Distinct (scope, user) pairs.
    pairs: usize,
}

/// What a membership row change did to the pair it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The user became a member of the scope.
    Granted,
    /// The user stopped being a member of the scope.
    Revoked,
    /// Another row still (or already) lists the pair.
    Unchanged,
}

impl MembershipIndex {
    /// One more row lists `user` in `scope`.
    pub fn add(&mut self, scope: &str, user: &str) -> Transition {
        let count = self
            .scopes
            .entry(scope.to_owned())
            .or_default()
            .entry(user.to_owned())
            .or_insert(0);
        *count += 1;
        if *count == 1 {
            self.pairs += 1;
            Transition::Granted
        } else {
            Transition::Unchanged
        }
    }

    /// One row fewer lists `user` in `scope`.
    pub fn remove(&mut self, scope: &str, user: &str) -> Transition {
        let Some(users) = self.scopes.get_mut(scope) else {
            return Transition::Unchanged;
        };
        let Some(count) = users.get_mut(user) else {
            return Transition::Unchanged;
        };
        *count -= 1;
        if *count > 0 {
            return Transition::Unchanged;
        }
        users.remove(user);
        if users.is_empty() {
            self.scopes.remove(scope);
        }
        self.pairs -= 1;
        Transition::Revoked
    }

    /// Forget every membership; return the (scope, user) pairs there were.
    pub fn clear(&mut self) -> Vec<(String, String)> {
        self.pairs = 0;
        std::mem::take(&mut self.scopes)
            .into_iter()
            .flat_map(|(scope, users)| users.into_keys().map(move |u| (scope.clone(), u)))
            .collect()
    }

    /// The members of `scope`, in no particular order.
    pub fn members<'a>(&'a self, scope: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.scopes
            .get(scope)
            .into_iter()
            .flat_map(|users| users.keys().map(String::as_str))
    }

    /// Distinct (scope, user) pairs.
    pub fn len(&self) -> usize {
        self.pairs
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

/// The keys of the published rows of one table, by scope.
#[derive(Debug, Default)]
pub struct ScopedRows {
    scopes: HashMap<String, HashSet<String>>,
    keys: usize,
}

impl ScopedRows {
    pub fn insert(&mut self, scope: &str, key: &str) {
        let added = match self.scopes.get_mut(scope) {
            Some(keys) => keys.insert(key.to_owned()),
            None => {
                self.scopes
                    .insert(scope.to_owned(), HashSet::from([key.to_owned()]));
                true
            }
        };
        self.keys += usize::from(added);
    }

    pub fn remove(&mut self, scope: &str, key: &str) {
        if let Some(keys) = self.scopes.get_mut(scope) {
            self.keys -= usize::from(keys.remove(key));
            if keys.is_empty() {
                self.scopes.remove(scope);
            }
        }
    }

    /// The keys of the rows in `scope`, in no particular order.
    pub fn keys<'a>(&'a self, scope: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.scopes
            .get(scope)
            .into_iter()
            .flat_map(|keys| keys.iter().map(String::as_str))
    }

    /// Rows indexed.
    pub fn len(&self) -> usize {
        self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

/// A scope value as text, the way both sides of a membership join compare: strings as they
/// are, numbers in decimal, booleans as `true` / `false`; NULL is no scope.
pub fn scope_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pair_listed_twice_is_revoked_with_its_last_row() {
        let mut m = MembershipIndex::default();
        assert_eq!(m.add("p1", "alice"), Transition::Granted);
        assert_eq!(m.add("p1", "alice"), Transition::Unchanged);
        assert_eq!(m.add("p1", "bob"), Transition::Granted);
        assert_eq!(m.len(), 2);
        assert_eq!(m.remove("p1", "alice"), Transition::Unchanged);
        assert!(m.members("p1").any(|u| u == "alice"));
        assert_eq!(m.remove("p1", "alice"), Transition::Revoked);
        assert!(!m.members("p1").any(|u| u == "alice"));
        assert_eq!(m.remove("p1", "alice"), Transition::Unchanged);
        assert_eq!(m.remove("p2", "carol"), Transition::Unchanged);
        assert_eq!(m.members("p1").collect::<Vec<_>>(), ["bob"]);
        assert_eq!(m.remove("p1", "bob"), Transition::Revoked);
        assert!(m.is_empty());
        assert_eq!(m.members("p1").count(), 0);
    }

    #[test]
    fn scoped_rows_follow_inserts_and_removals() {
        let mut r = ScopedRows::default();
        r.insert("p1", "1");
        r.insert("p1", "1");
        r.insert("p1", "2");
        r.insert("p2", "3");
        assert_eq!(r.len(), 3);
        let mut keys: Vec<_> = r.keys("p1").collect();
        keys.sort();
        assert_eq!(keys, ["1", "2"]);
        r.remove("p1", "1");
        r.remove("p1", "2");
        r.remove("p9", "2");
        assert_eq!(r.keys("p1").count(), 0);
        assert_eq!(r.len(), 1);
        r.remove("p2", "3");
        assert!(r.is_empty());
    }

    #[test]
    fn scope_values_compare_as_text() {
        assert_eq!(scope_text(&json!(42)), Some("42".into()));
        assert_eq!(scope_text(&json!("42")), Some("42".into()));
        assert_eq!(scope_text(&json!(true)), Some("true".into()));
        assert_eq!(scope_text(&json!(null)), None);
    }
}
