//! Live reload of the clusters file. It is polled, not watched: a mounted ConfigMap is
//! updated by swapping the `..data` symlink to a new directory, which a watch on the
//! file's old inode never sees. Content is compared, not mtimes.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tracing::{error, info};

use crate::clusters_file::{ClustersConfig, load};
use crate::workload::Workloads;

/// How often the file (and the files it names) are read and compared.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The bytes of the clusters file and of each file it names (`None`: unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    files: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl Snapshot {
    /// Reads `path` and `others` now.
    pub fn take(path: &Path, others: &[PathBuf]) -> Snapshot {
        let files = std::iter::once(path)
            .chain(others.iter().map(PathBuf::as_path))
            .map(|p| (p.to_owned(), std::fs::read(p).ok()))
            .collect();
        Snapshot { files }
    }

    fn others(&self) -> Vec<PathBuf> {
        self.files.iter().skip(1).map(|(p, _)| p.clone()).collect()
    }

    fn main_file(&self) -> Option<&Option<Vec<u8>>> {
        self.files.first().map(|(_, bytes)| bytes)
    }
}

/// What counts as seen after a load: `after` (the file and the files the loaded version
/// names, read just after loading it), unless the file changed between `before` (read
/// just before loading) and `after` — then `before`, so the next poll loads the newer
/// version instead of marking it seen unloaded.
fn settle(before: Snapshot, after: Snapshot) -> Snapshot {
    if before.main_file() == after.main_file() {
        after
    } else {
        before
    }
}

/// Polls `path` every [`POLL_INTERVAL`] and, when it or a file it names changed, loads
/// it and swaps it into `workloads`. A file that does not load is logged and ignored
/// (the running configuration stays); each distinct bad version is logged once.
/// `running` is the configuration `workloads` was built from.
pub async fn watch(
    path: PathBuf,
    own_namespace: String,
    workloads: Workloads,
    running: ClustersConfig,
) {
    let mut seen = Snapshot::take(&path, &running.file_paths());
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let now = Snapshot::take(&path, &seen.others());
        if now == seen {
            continue;
        }
        seen = now.clone();
        let config = match load(&path, &own_namespace) {
            Ok(config) => config,
            Err(e) => {
                error!(
                    path = %path.display(),
                    error = %e,
                    "clusters config rejected; keeping the running config"
                );
                continue;
            }
        };
        // Track the files the new version names, as read for this load.
        seen = settle(now, Snapshot::take(&path, &config.file_paths()));
        match workloads.replace(&config, &path).await {
            Ok(generation) => {
                let names: Vec<&str> = config.clusters.iter().map(|c| c.name.as_str()).collect();
                info!(
                    path = %path.display(),
                    generation,
                    clusters = ?names,
                    "clusters config reloaded"
                );
            }
            Err(e) => error!(
                path = %path.display(),
                error = %e,
                "clusters config rejected; keeping the running config"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_during_a_load_is_not_marked_seen() {
        let dir = tempfile::tempdir().unwrap();
        let (config, ca) = (dir.path().join("clusters.yaml"), dir.path().join("ca.pem"));
        std::fs::write(&config, "v1").unwrap();
        std::fs::write(&ca, "1").unwrap();
        let before = Snapshot::take(&config, &[]);
        // Unchanged while loading: what the loaded version names is tracked.
        let after = Snapshot::take(&config, std::slice::from_ref(&ca));
        assert_eq!(settle(before.clone(), after.clone()), after);
        // Changed while loading: `before` stays, so the next poll sees v2 as new.
        std::fs::write(&config, "v2").unwrap();
        let raced = Snapshot::take(&config, std::slice::from_ref(&ca));
        let seen = settle(before.clone(), raced.clone());
        assert_eq!(seen, before);
        assert_ne!(seen, raced, "the next poll reloads");
    }

    #[test]
    fn snapshots_differ_when_any_tracked_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (config, ca) = (dir.path().join("clusters.yaml"), dir.path().join("ca.pem"));
        std::fs::write(&config, "a").unwrap();
        std::fs::write(&ca, "1").unwrap();
        let before = Snapshot::take(&config, std::slice::from_ref(&ca));
        assert_eq!(before, Snapshot::take(&config, std::slice::from_ref(&ca)));
        std::fs::write(&ca, "2").unwrap();
        assert_ne!(before, Snapshot::take(&config, std::slice::from_ref(&ca)));
        std::fs::remove_file(&config).unwrap();
        let gone = Snapshot::take(&config, std::slice::from_ref(&ca));
        assert_eq!(gone.files[0].1, None);
        assert_eq!(gone.others(), [ca]);
    }

    #[test]
    fn a_symlink_swap_is_seen_as_a_change() {
        // How kubelet updates a ConfigMap volume: ..data → a new directory.
        let dir = tempfile::tempdir().unwrap();
        for (version, text) in [("v1", "one"), ("v2", "two")] {
            std::fs::create_dir(dir.path().join(version)).unwrap();
            std::fs::write(dir.path().join(version).join("clusters.yaml"), text).unwrap();
        }
        std::os::unix::fs::symlink("v1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/clusters.yaml", dir.path().join("clusters.yaml"))
            .unwrap();
        let path = dir.path().join("clusters.yaml");
        let before = Snapshot::take(&path, &[]);
        std::os::unix::fs::symlink("v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        let after = Snapshot::take(&path, &[]);
        assert_ne!(before, after);
        assert_eq!(after.files[0].1.as_deref(), Some(b"two".as_slice()));
    }
}
