//! `Closure`: a set of store paths with their NAR hash, NAR size and references, loaded from
//! the JSON forms Nix prints (exportReferencesGraph, `nix path-info --json`, old and new) or from
//! registration text, plus the graph questions the builder and verifier ask of it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;

use crate::hash::NarHash;
use crate::store_path::{StoreDir, StorePath};

/// What Nix knows about one valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Option<NarHash>,
    pub nar_size: Option<u64>,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
}

impl PathInfo {
    pub fn new(path: StorePath) -> Self {
        PathInfo {
            path,
            nar_hash: None,
            nar_size: None,
            references: BTreeSet::new(),
            deriver: None,
        }
    }
}

/// Why closure input was rejected. (Causes are part of the message, not chained as a
/// `source`: printed once however the error is formatted.)
#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error("closure JSON is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("closure JSON: {0}")]
    Shape(String),
    #[error("registration text, line {line}: {reason}")]
    Registration { line: usize, reason: String },
    #[error("closure entry {path}: {reason}")]
    Entry { path: String, reason: String },
    #[error("{referrer} references {missing}, which is not in the closure")]
    Dangling { referrer: String, missing: String },
    #[error("{0} is not in the closure")]
    NotInClosure(String),
}

impl From<serde_json::Error> for ClosureError {
    fn from(e: serde_json::Error) -> Self {
        ClosureError::Json(e)
    }
}

/// A reference graph of store paths, sorted by base name, closed under references.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    pub store_dir: StoreDir,
    /// Insertion order of the source (exportReferencesGraph order matters for closureInfo).
    order: Vec<StorePath>,
    infos: BTreeMap<StorePath, PathInfo>,
}

impl Closure {
    /// Builds a closure from path infos; every reference must be one of them.
    pub fn new(store_dir: StoreDir, infos: Vec<PathInfo>) -> Result<Self, ClosureError> {
        let mut closure = Closure {
            store_dir,
            order: Vec::new(),
            infos: BTreeMap::new(),
        };
        for info in infos {
            if closure.infos.contains_key(&info.path) {
                return Err(ClosureError::Entry {
                    path: closure.store_dir.display(&info.path),
                    reason: "listed twice".to_owned(),
                });
            }
            closure.order.push(info.path.clone());
            closure.infos.insert(info.path.clone(), info);
        }
        for info in closure.infos.values() {
            if let Some(missing) = info
                .references
                .iter()
                .find(|r| !closure.infos.contains_key(*r))
            {
                return Err(ClosureError::Dangling {
                    referrer: closure.store_dir.display(&info.path),
                    missing: closure.store_dir.display(missing),
                });
            }
        }
        Ok(closure)
    }

    /// Parses any JSON form: a path-info array (old `nix path-info --json` and
    /// exportReferencesGraph), a path-info object keyed by path (new `nix path-info --json`),
    /// or a structured-attrs file (`$NIX_ATTRS_JSON_FILE`) where some key holds such an array.
    /// `key` picks the attribute when several hold closures.
    pub fn from_json(
        text: &str,
        key: Option<&str>,
        store_dir: &StoreDir,
    ) -> Result<Self, ClosureError> {
        let value: Value = serde_json::from_str(text)?;
        let entries = select_entries(&value, key)?;
        let infos = entries
            .into_iter()
            .map(|(path, v)| path_info_from_json(path, v, store_dir))
            .collect::<Result<Vec<_>, _>>()?;
        Closure::new(store_dir.clone(), infos)
    }

    pub fn len(&self) -> usize {
        self.infos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    pub fn contains(&self, path: &StorePath) -> bool {
        self.infos.contains_key(path)
    }

    pub fn get(&self, path: &StorePath) -> Option<&PathInfo> {
        self.infos.get(path)
    }

    /// Path infos sorted by base name.
    pub fn iter(&self) -> impl Iterator<Item = &PathInfo> {
        self.infos.values()
    }

    /// Path infos in the order the source listed them.
    pub fn iter_source_order(&self) -> impl Iterator<Item = &PathInfo> {
        self.order.iter().filter_map(|p| self.infos.get(p))
    }

    /// Full logical path (`/nix/store/...`) of a member.
    pub fn display(&self, path: &StorePath) -> String {
        self.store_dir.display(path)
    }

    /// The paths no other member references (a closure's roots).
    pub fn roots(&self) -> BTreeSet<StorePath> {
        let referenced: BTreeSet<&StorePath> = self
            .infos
            .values()
            .flat_map(|i| i.references.iter().filter(move |r| **r != i.path))
            .collect();
        self.infos
            .keys()
            .filter(|p| !referenced.contains(p))
            .cloned()
            .collect()
    }

    /// Everything reachable from `roots` by references, never entering a path in `cut`
    /// (a root in `cut` is not entered either).
    pub fn reachable_avoiding(
        &self,
        roots: impl IntoIterator<Item = StorePath>,
        cut: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ClosureError> {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<StorePath> = VecDeque::new();
        for root in roots {
            if !self.infos.contains_key(&root) {
                return Err(ClosureError::NotInClosure(self.display(&root)));
            }
            if !cut.contains(&root) && seen.insert(root.clone()) {
                queue.push_back(root);
            }
        }
        while let Some(p) = queue.pop_front() {
            for r in &self.infos[&p].references {
                if !cut.contains(r) && seen.insert(r.clone()) {
                    queue.push_back(r.clone());
                }
            }
        }
        Ok(seen)
    }

    /// The closure of `roots` (Nix's `--requisites`).
    pub fn requisites(
        &self,
        roots: impl IntoIterator<Item = StorePath>,
    ) -> Result<BTreeSet<StorePath>, ClosureError> {
        self.reachable_avoiding(roots, &BTreeSet::new())
    }

    /// The sub-closure of `roots` as its own `Closure` (same source order).
    pub fn restrict_to(
        &self,
        roots: impl IntoIterator<Item = StorePath>,
    ) -> Result<Closure, ClosureError> {
        let keep = self.requisites(roots)?;
        let infos = self
            .iter_source_order()
            .filter(|i| keep.contains(&i.path))
            .cloned()
            .collect();
        Closure::new(self.store_dir.clone(), infos)
    }

    /// `paths` (members only) as a closure of their own: references to paths outside the set
    /// are dropped, so the result describes those paths' contents, not their dependencies (one
    /// layer of a layered store disk). Source order is kept.
    pub fn subset(&self, paths: &BTreeSet<StorePath>) -> Result<Closure, ClosureError> {
        if let Some(outside) = paths.iter().find(|p| !self.infos.contains_key(*p)) {
            return Err(ClosureError::NotInClosure(self.display(outside)));
        }
        let infos = self
            .iter_source_order()
            .filter(|i| paths.contains(&i.path))
            .map(|i| {
                let mut info = i.clone();
                info.references.retain(|r| paths.contains(r));
                info
            })
            .collect();
        Closure::new(self.store_dir.clone(), infos)
    }

    /// For every member, how many members its closure holds (itself included): one pass in
    /// dependency order over bit sets, so a closure of thousands of paths takes milliseconds.
    pub fn requisite_counts(&self) -> BTreeMap<StorePath, usize> {
        let index: BTreeMap<&StorePath, usize> =
            self.infos.keys().enumerate().map(|(i, p)| (p, i)).collect();
        let words = self.infos.len().div_ceil(64);
        let mut reach: Vec<Option<Vec<u64>>> = vec![None; self.infos.len()];
        let paths: Vec<&StorePath> = self.infos.keys().collect();
        // Depth-first post-order without recursion: a path's set is the union of its
        // references' sets, so references are finished first. Reference cycles (only
        // self-references exist in Nix) are skipped by the `visiting` state.
        let mut visiting = vec![false; paths.len()];
        for start in 0..paths.len() {
            if reach[start].is_some() {
                continue;
            }
            let mut stack = vec![(start, false)];
            while let Some((at, expanded)) = stack.pop() {
                if reach[at].is_some() {
                    continue;
                }
                let refs = self.infos[paths[at]].references.iter().map(|r| index[r]);
                if expanded {
                    let mut set = vec![0u64; words];
                    set[at / 64] |= 1 << (at % 64);
                    for r in refs.filter(|r| *r != at) {
                        if let Some(sub) = &reach[r] {
                            for (w, s) in set.iter_mut().zip(sub) {
                                *w |= s;
                            }
                        }
                    }
                    reach[at] = Some(set);
                    visiting[at] = false;
                } else {
                    visiting[at] = true;
                    stack.push((at, true));
                    for r in refs {
                        if r != at && reach[r].is_none() && !visiting[r] {
                            stack.push((r, false));
                        }
                    }
                }
            }
        }
        paths
            .into_iter()
            .zip(reach)
            .map(|(p, set)| {
                let count = set.map_or(1, |s| s.iter().map(|w| w.count_ones() as usize).sum());
                (p.clone(), count)
            })
            .collect()
    }

    /// For every path reachable from `from`, the shortest reference chain `[from, ..., path]`
    /// (breadth first, ties broken by base name so the answer is stable).
    pub fn shortest_chains(
        &self,
        from: &StorePath,
    ) -> Result<BTreeMap<StorePath, Vec<StorePath>>, ClosureError> {
        if !self.infos.contains_key(from) {
            return Err(ClosureError::NotInClosure(self.display(from)));
        }
        let mut parent: BTreeMap<StorePath, Option<StorePath>> = BTreeMap::new();
        parent.insert(from.clone(), None);
        let mut queue = VecDeque::from([from.clone()]);
        while let Some(p) = queue.pop_front() {
            for r in &self.infos[&p].references {
                if !parent.contains_key(r) {
                    parent.insert(r.clone(), Some(p.clone()));
                    queue.push_back(r.clone());
                }
            }
        }
        let mut chains = BTreeMap::new();
        for target in parent.keys() {
            let mut chain = vec![target.clone()];
            let mut at = target;
            while let Some(Some(up)) = parent.get(at) {
                chain.push(up.clone());
                at = up;
            }
            chain.reverse();
            chains.insert(target.clone(), chain);
        }
        Ok(chains)
    }

    /// Drops a member's outgoing references (the graph with that node made a leaf); no-op for a
    /// path not in the closure.
    pub fn clear_references(&mut self, path: &StorePath) {
        if let Some(info) = self.infos.get_mut(path) {
            info.references.clear();
        }
    }

    /// Records the NAR hash and size of a member (no-op for a path not in the closure).
    pub fn set_nar_hash(&mut self, path: &StorePath, nar_hash: NarHash, nar_size: u64) {
        if let Some(info) = self.infos.get_mut(path) {
            info.nar_hash = Some(nar_hash);
            info.nar_size = Some(nar_size);
        }
    }

    /// Sum of the NAR sizes of `paths` (paths without a recorded size count 0).
    pub fn nar_size_of<'a>(&self, paths: impl IntoIterator<Item = &'a StorePath>) -> u64 {
        paths
            .into_iter()
            .filter_map(|p| self.infos.get(p).and_then(|i| i.nar_size))
            .sum()
    }
}

/// Finds the list of path-info entries in any accepted JSON shape, as (path text, object).
fn select_entries<'v>(
    value: &'v Value,
    key: Option<&str>,
) -> Result<Vec<(String, &'v Value)>, ClosureError> {
    let shape = |m: &str| ClosureError::Shape(m.to_owned());
    match value {
        Value::Array(items) => array_entries(items),
        Value::Object(map) => {
            if let Some(key) = key {
                let v = map.get(key).ok_or_else(|| {
                    ClosureError::Shape(format!("no attribute {key:?} in the closure JSON"))
                })?;
                return select_entries(v, None);
            }
            // New `nix path-info --json`: { "/nix/store/...": {narHash, ...} | null }.
            if !map.is_empty() && map.keys().all(|k| k.starts_with('/')) {
                return map
                    .iter()
                    .map(|(k, v)| match v {
                        Value::Object(_) => Ok((k.clone(), v)),
                        _ => Err(ClosureError::Entry {
                            path: k.clone(),
                            reason: "not a valid path (nix path-info gave no info for it)"
                                .to_owned(),
                        }),
                    })
                    .collect();
            }
            // A structured-attrs file: the attributes whose value is a list of path infos.
            let candidates: Vec<&String> = map
                .iter()
                .filter(|(_, v)| is_path_info_array(v))
                .map(|(k, _)| k)
                .collect();
            match candidates.as_slice() {
                [one] => array_entries(map[*one].as_array().ok_or_else(|| shape("unreachable"))?),
                [] => Err(shape(
                    "found no list of {path, narHash, narSize, references} objects (expected exportReferencesGraph or nix path-info --json output)",
                )),
                many => Err(ClosureError::Shape(format!(
                    "several attributes hold closures ({}); name one",
                    many.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                ))),
            }
        }
        _ => Err(shape("expected a JSON array or object")),
    }
}

fn is_path_info_array(v: &Value) -> bool {
    match v.as_array() {
        Some(items) => {
            !items.is_empty()
                && items
                    .iter()
                    .all(|i| i.get("path").is_some_and(Value::is_string))
        }
        None => false,
    }
}

fn array_entries(items: &[Value]) -> Result<Vec<(String, &Value)>, ClosureError> {
    items
        .iter()
        .enumerate()
        .map(|(n, item)| match item.get("path").and_then(Value::as_str) {
            Some(p) => Ok((p.to_owned(), item)),
            None => Err(ClosureError::Shape(format!(
                "entry {n} has no \"path\" string"
            ))),
        })
        .collect()
}

fn path_info_from_json(
    path_text: String,
    v: &Value,
    store_dir: &StoreDir,
) -> Result<PathInfo, ClosureError> {
    let entry_err = |reason: String| ClosureError::Entry {
        path: path_text.clone(),
        reason,
    };
    let path = store_dir
        .parse_path(&path_text)
        .map_err(|e| entry_err(e.reason))?;
    // Old `nix path-info --json` lists a path it does not have as {"path": ..., "valid": false}.
    if v.get("valid") == Some(&Value::Bool(false)) {
        return Err(entry_err(
            "not a valid path (nix path-info marks it \"valid\": false)".to_owned(),
        ));
    }
    let nar_hash = match v.get("narHash") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse()
                .map_err(|e: crate::NarHashError| entry_err(e.to_string()))?,
        ),
        Some(_) => return Err(entry_err("narHash is not a string".to_owned())),
    };
    let nar_size = match v.get("narSize") {
        None | Some(Value::Null) => None,
        Some(n) => Some(
            n.as_u64()
                .ok_or_else(|| entry_err("narSize is not a non-negative integer".to_owned()))?,
        ),
    };
    let mut references = BTreeSet::new();
    match v.get("references") {
        None | Some(Value::Null) => {}
        Some(Value::Array(refs)) => {
            for r in refs {
                let text = r
                    .as_str()
                    .ok_or_else(|| entry_err("a reference is not a string".to_owned()))?;
                references.insert(
                    store_dir
                        .parse_path_or_base_name(text)
                        .map_err(|e| entry_err(format!("reference {text:?}: {}", e.reason)))?,
                );
            }
        }
        Some(_) => return Err(entry_err("references is not a list".to_owned())),
    }
    let deriver = match v.get("deriver").and_then(Value::as_str) {
        Some(d) if !d.is_empty() => store_dir.parse_path_or_base_name(d).ok(),
        _ => None,
    };
    Ok(PathInfo {
        path,
        nar_hash,
        nar_size,
        references,
        deriver,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> String {
        use sha2::Digest;
        let hash = crate::base32::encode(&sha2::Sha256::digest(name.as_bytes())[..20]);
        format!("/nix/store/{hash}-{name}")
    }

    fn sp(name: &str) -> StorePath {
        StoreDir::default().parse_path(&p(name)).unwrap()
    }

    const H: &str = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";

    fn graph_json() -> String {
        serde_json::json!([
            {"path": p("runner"), "narHash": H, "narSize": 10, "references": [p("bash"), p("toplevel")]},
            {"path": p("toplevel"), "narHash": H, "narSize": 100, "references": [p("glibc"), p("toplevel")]},
            {"path": p("bash"), "narHash": H, "narSize": 20, "references": [p("glibc")]},
            {"path": p("glibc"), "narHash": H, "narSize": 30, "references": []},
        ])
        .to_string()
    }

    #[test]
    fn loads_the_array_form_and_answers_graph_questions() {
        let c = Closure::from_json(&graph_json(), None, &StoreDir::default()).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c.roots(), BTreeSet::from([sp("runner")]));
        let cut = BTreeSet::from([sp("toplevel")]);
        let kept = c.reachable_avoiding([sp("runner")], &cut).unwrap();
        assert_eq!(
            kept,
            BTreeSet::from([sp("runner"), sp("bash"), sp("glibc")])
        );
        let chains = c.shortest_chains(&sp("runner")).unwrap();
        assert_eq!(chains[&sp("toplevel")], vec![sp("runner"), sp("toplevel")]);
        // Two chains of length 3 reach glibc; the tie goes to the referrer first by base name.
        let via = if sp("bash") < sp("toplevel") {
            sp("bash")
        } else {
            sp("toplevel")
        };
        assert_eq!(chains[&sp("glibc")], vec![sp("runner"), via, sp("glibc")]);
        assert_eq!(c.nar_size_of(&[sp("bash"), sp("glibc")]), 50);
        assert_eq!(c.restrict_to([sp("bash")]).unwrap().len(), 2);
    }

    #[test]
    fn counts_requisites_and_takes_subsets() {
        let c = Closure::from_json(&graph_json(), None, &StoreDir::default()).unwrap();
        let counts = c.requisite_counts();
        // toplevel's self-reference does not count twice.
        assert_eq!(counts[&sp("runner")], 4);
        assert_eq!(counts[&sp("toplevel")], 2);
        assert_eq!(counts[&sp("bash")], 2);
        assert_eq!(counts[&sp("glibc")], 1);
        for info in c.iter() {
            let requisites = c.requisites([info.path.clone()]).unwrap().len();
            assert_eq!(counts[&info.path], requisites, "{}", info.path);
        }

        let half = c
            .subset(&BTreeSet::from([sp("runner"), sp("bash")]))
            .unwrap();
        assert_eq!(half.len(), 2);
        // References leaving the subset are dropped; the one inside stays.
        assert_eq!(
            half.get(&sp("runner")).unwrap().references,
            BTreeSet::from([sp("bash")])
        );
        assert!(half.get(&sp("bash")).unwrap().references.is_empty());
        assert!(matches!(
            c.subset(&BTreeSet::from([sp("elsewhere")])),
            Err(ClosureError::NotInClosure(_))
        ));
    }

    #[test]
    fn loads_the_object_form_and_structured_attrs() {
        let array: Value = serde_json::from_str(&graph_json()).unwrap();
        let mut object = serde_json::Map::new();
        for item in array.as_array().unwrap() {
            let mut item = item.clone();
            let path = item["path"].as_str().unwrap().to_owned();
            item.as_object_mut().unwrap().remove("path");
            object.insert(path, item);
        }
        let from_object = Closure::from_json(
            &Value::Object(object).to_string(),
            None,
            &StoreDir::default(),
        )
        .unwrap();
        let attrs = serde_json::json!({"closure": array, "outputs": {"out": "/x"}, "name": "n"})
            .to_string();
        let from_attrs = Closure::from_json(&attrs, None, &StoreDir::default()).unwrap();
        assert_eq!(
            from_object.iter().collect::<Vec<_>>(),
            from_attrs.iter().collect::<Vec<_>>()
        );

        let two = serde_json::json!({"a": array, "b": array}).to_string();
        let err = Closure::from_json(&two, None, &StoreDir::default()).unwrap_err();
        assert!(err.to_string().contains("a, b"), "{err}");
        assert_eq!(
            Closure::from_json(&two, Some("b"), &StoreDir::default())
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn rejects_dangling_references_and_bad_entries() {
        let dangling = serde_json::json!([{"path": p("a"), "references": [p("b")]}]).to_string();
        assert!(matches!(
            Closure::from_json(&dangling, None, &StoreDir::default()),
            Err(ClosureError::Dangling { .. })
        ));
        let invalid = serde_json::json!([{"path": p("a"), "valid": false}]).to_string();
        let err = Closure::from_json(&invalid, None, &StoreDir::default()).unwrap_err();
        assert!(err.to_string().contains("not a valid path"), "{err}");
        let bad_hash = serde_json::json!([{"path": p("a"), "narHash": "md5:x"}]).to_string();
        assert!(Closure::from_json(&bad_hash, None, &StoreDir::default()).is_err());
        let null_info = serde_json::json!({ p("a"): null }).to_string();
        assert!(Closure::from_json(&null_info, None, &StoreDir::default()).is_err());
        assert!(Closure::from_json("{", None, &StoreDir::default()).is_err());
    }
}
