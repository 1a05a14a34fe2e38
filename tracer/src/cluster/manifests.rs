//! Loads cluster objects from kubectl output saved to disk (`--cluster-state PATH`).
//!
//! Accepts what `kubectl get -o yaml|json` writes: single objects, `List`s (and typed
//! lists such as `PodList`), multi-document YAML, and directories of such files. A bad
//! document or object is reported with its file and position and skipped; everything
//! else still loads.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use crate::policy::Policy;
use serde_json::Value;

/// Objects read from manifests. Kinds the tracer does not use are skipped silently.
#[derive(Debug, Default)]
pub struct Manifests {
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub namespaces: Vec<Namespace>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// NetworkPolicies, validated.
    pub policies: Vec<Policy>,
    /// Problems with individual files, documents or objects; the rest was loaded.
    pub warnings: Vec<ManifestWarning>,
}

/// One file, document or object that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestWarning {
    pub file: PathBuf,
    /// 1-based position of the YAML document in the file.
    pub document: usize,
    /// `Kind ns/name` when the object got far enough to be named.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)?;
        if let Some(object) = &self.object {
            write!(f, ", {object}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Errors that stop loading altogether (the path itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read cluster state at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Loads a file, or every `.yaml`, `.yml` and `.json` file below a directory (sorted, so
/// later files win in a stable way).
pub fn load(path: &Path) -> Result<Manifests, LoadError> {
    let io_error = |source| LoadError::Io {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    if fs::metadata(path).map_err(io_error)?.is_dir() {
        collect_files(path, &mut files).map_err(io_error)?;
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut manifests = Manifests::default();
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => load_text(&file, &text, &mut manifests),
            Err(e) => manifests.warnings.push(ManifestWarning {
                file,
                document: 0,
                object: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    Ok(manifests)
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, files)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            files.push(path);
        }
    }
    Ok(())
}

/// Parses one file's text (YAML, which includes JSON) into `manifests`.
pub fn load_text(file: &Path, text: &str, manifests: &mut Manifests) {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let position = index + 1;
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => add_object(file, position, value, manifests),
            Err(e) => {
                manifests.warnings.push(ManifestWarning {
                    file: file.to_owned(),
                    document: position,
                    object: None,
                    message: format!("not valid YAML/JSON: {e}"),
                });
                // A syntax error ends the stream: later documents cannot be located.
                if e.location().is_some() {
                    break;
                }
            }
        }
    }
}

fn add_object(file: &Path, document: usize, value: Value, manifests: &mut Manifests) {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind == "List" || kind.ends_with("List") {
        match value {
            Value::Object(mut list) => {
                if let Some(Value::Array(items)) = list.remove("items") {
                    for item in items {
                        add_object(file, document, item, manifests);
                    }
                }
            }
            _ => unreachable!("a value with a kind is an object"),
        }
        return;
    }
    let object = describe(&kind, &value);
    let result = match kind.as_str() {
        "Pod" => parse_named(value, &mut manifests.pods),
        "Service" => parse_named(value, &mut manifests.services),
        "Namespace" => parse_named(value, &mut manifests.namespaces),
        "EndpointSlice" => parse_named(value, &mut manifests.endpoint_slices),
        "NetworkPolicy" => parse_policy(value, &mut manifests.policies),
        "" => Err("has no kind".into()),
        _ => Ok(()),
    };
    if let Err(message) = result {
        manifests.warnings.push(ManifestWarning {
            file: file.to_owned(),
            document,
            object: Some(object),
            message,
        });
    }
}

fn parse_policy(value: Value, into: &mut Vec<Policy>) -> Result<(), String> {
    let object: NetworkPolicy = serde_json::from_value(value).map_err(|e| e.to_string())?;
    into.push(Policy::from_k8s(&object)?);
    Ok(())
}

/// Adds a named object of type `T` to `into`.
fn parse_named<T>(value: Value, into: &mut Vec<T>) -> Result<(), String>
where
    T: k8s_openapi::Metadata<Ty = ObjectMeta> + serde::de::DeserializeOwned,
{
    let object: T = serde_json::from_value(value).map_err(|e| e.to_string())?;
    if object.metadata().name.is_none() {
        return Err("has no metadata.name".into());
    }
    into.push(object);
    Ok(())
}

fn describe(kind: &str, value: &Value) -> String {
    let field = |name: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
    };
    let kind = if kind.is_empty() { "object" } else { kind };
    match (field("namespace"), field("name")) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => format!("{kind} without a name"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Manifests {
        let mut m = Manifests::default();
        load_text(Path::new("state.yaml"), text, &mut m);
        m
    }

    fn names(m: &Manifests) -> Vec<String> {
        m.pods
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect()
    }

    #[test]
    fn single_yaml_pod() {
        let m = load_str(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  uid: 6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b\n  labels: {app: web}\nstatus:\n  podIP: 10.244.0.5\n",
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let pod = &m.pods[0];
        assert_eq!(pod.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(
            pod.metadata.uid.as_deref(),
            Some("6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b")
        );
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["app"], "web");
        assert_eq!(
            pod.status.as_ref().unwrap().pod_ip.as_deref(),
            Some("10.244.0.5")
        );
    }

    #[test]
    fn json_list_and_typed_list() {
        let m = load_str(
            r#"{"apiVersion":"v1","kind":"List","items":[
                {"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","namespace":"x"}},
                {"apiVersion":"v1","kind":"PodList","items":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"b"}}]},
                {"apiVersion":"v1","kind":"Service","metadata":{"name":"svc"}}]}"#,
        );
        assert_eq!(names(&m), vec!["a", "b"]);
        assert!(m.warnings.is_empty());
    }

    #[test]
    fn multi_document_yaml_with_a_bad_object_in_the_middle() {
        let m = load_str(
            "kind: Pod\napiVersion: v1\nmetadata: {name: first}\n---\n\
             kind: Pod\napiVersion: v1\nmetadata: {name: broken, namespace: ns}\nspec: {containers: 7}\n---\n\
             ---\nkind: Pod\napiVersion: v1\nmetadata: {name: third}\n",
        );
        assert_eq!(names(&m), vec!["first", "third"]);
        assert_eq!(m.warnings.len(), 1);
        let w = &m.warnings[0];
        assert_eq!(w.document, 2);
        assert_eq!(w.object.as_deref(), Some("Pod ns/broken"));
        assert!(
            w.to_string()
                .starts_with("state.yaml (document 2), Pod ns/broken: "),
            "{w}"
        );
    }

    #[test]
    fn object_without_kind_or_name() {
        let m = load_str(
            "metadata: {name: x}\n---\nkind: Pod\napiVersion: v1\nmetadata: {namespace: y}\n",
        );
        assert!(m.pods.is_empty());
        let messages: Vec<_> = m
            .warnings
            .iter()
            .map(|w| (w.document, w.message.as_str()))
            .collect();
        assert_eq!(
            messages,
            vec![(1, "has no kind"), (2, "has no metadata.name")]
        );
    }

    #[test]
    fn syntax_error_is_reported_not_fatal() {
        let m = load_str("kind: Pod\nmetadata: {name: ok}\n---\nkind: [unclosed\n");
        assert_eq!(names(&m), vec!["ok"]);
        assert_eq!(m.warnings.len(), 1);
        assert_eq!(m.warnings[0].document, 2);
        assert!(m.warnings[0].message.starts_with("not valid YAML/JSON"));
    }

    #[test]
    fn directory_of_files() {
        let dir = std::env::temp_dir().join(format!("manifests-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("a.yaml"), "kind: Pod\nmetadata: {name: a}\n").unwrap();
        fs::write(
            dir.join("sub/b.json"),
            r#"{"kind":"Pod","metadata":{"name":"b"}}"#,
        )
        .unwrap();
        fs::write(
            dir.join("notes.txt"),
            "kind: Pod\nmetadata: {name: ignored}\n",
        )
        .unwrap();
        let m = load(&dir).unwrap();
        assert_eq!(names(&m), vec!["a", "b"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_path_is_an_error() {
        let err = load(Path::new("/nonexistent/cluster-state")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cluster-state"));
    }
}
