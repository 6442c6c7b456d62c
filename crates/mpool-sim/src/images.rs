//! The simulator's image servers: a fixed catalogue standing in for Canonical's simplestreams
//! remotes (`release`, `daily`) and the blueprint list, and multipassd's rules for what a
//! `launch` may name (reference §0.1, §0.3; `daemon.cpp` `query_from`/`validate_image`,
//! `default_vm_image_vault.cpp`, `base_vm_image_vault.h` at v1.16.3).
//!
//! No network is reachable from the simulator: `http(s)://` images fail to download, `file://`
//! images must exist on the host, and with the image servers switched off (`--no-image-servers`)
//! every catalogue lookup fails as multipassd does when it cannot fetch its manifests.

use std::path::{Path, PathBuf};

use tonic::Code;

use super::rules::Refusal;
use mpool_multipass::proto::multipass as pb;

/// One image of a remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogueImage {
    /// The remote it is served from (`release` or `daily`).
    pub remote: &'static str,
    /// Its aliases; the first is the version (`24.04`).
    pub aliases: &'static [&'static str],
    /// `Ubuntu`.
    pub os: &'static str,
    /// The release title (`24.04 LTS`).
    pub release: &'static str,
    /// The image version (a date).
    pub version: &'static str,
    /// The code name.
    pub codename: &'static str,
}

/// A blueprint (multipass 1.16 still serves them, with a deprecation warning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blueprint {
    /// Its name, which is also how it is launched.
    pub name: &'static str,
    /// What `find` shows as its release.
    pub release: &'static str,
    /// The image it boots.
    pub base: &'static str,
}

/// The remote used when none is named, searched first.
pub const DEFAULT_REMOTE: &str = "release";

/// The images the simulator serves.
pub const IMAGES: &[CatalogueImage] = &[
    CatalogueImage {
        remote: "release",
        aliases: &["20.04", "focal"],
        os: "Ubuntu",
        release: "20.04 LTS",
        version: "20261110",
        codename: "focal",
    },
    CatalogueImage {
        remote: "release",
        aliases: &["22.04", "jammy"],
        os: "Ubuntu",
        release: "22.04 LTS",
        version: "20261115",
        codename: "jammy",
    },
    CatalogueImage {
        remote: "release",
        aliases: &["24.04", "noble", "lts", "default"],
        os: "Ubuntu",
        release: "24.04 LTS",
        version: "20261120",
        codename: "noble",
    },
    CatalogueImage {
        remote: "daily",
        aliases: &["24.04", "noble"],
        os: "Ubuntu",
        release: "24.04 LTS",
        version: "20261201",
        codename: "noble",
    },
    CatalogueImage {
        remote: "daily",
        aliases: &["25.10", "questing", "devel"],
        os: "Ubuntu",
        release: "25.10",
        version: "20261201",
        codename: "questing",
    },
];

/// The blueprints the simulator serves.
pub const BLUEPRINTS: &[Blueprint] = &[
    Blueprint { name: "docker", release: "A Docker environment with Portainer and related tools", base: "24.04" },
    Blueprint { name: "minikube", release: "minikube is local Kubernetes", base: "24.04" },
];

/// What a launch resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// A catalogue image.
    Image(CatalogueImage),
    /// A blueprint.
    Blueprint(Blueprint),
    /// A local file (`file:///path`).
    File(PathBuf),
}

impl Resolved {
    /// The release `list` and `info` report for an instance launched from it: the image's
    /// release title (`24.04 LTS`; the multipass CLI prints it as "Ubuntu 24.04 LTS"), empty
    /// for a local file (shown as "Not Available").
    pub fn release_text(&self) -> String {
        match self {
            Resolved::Image(i) => i.release.to_string(),
            Resolved::Blueprint(b) => image_named(b.base, "").map(|i| i.release.to_string()).unwrap_or_default(),
            Resolved::File(_) => String::new(),
        }
    }
}

/// The catalogue image `alias` names on `remote` ("" searches `release`, then `daily`).
pub fn image_named(alias: &str, remote: &str) -> Option<CatalogueImage> {
    let remotes: &[&str] = if remote.is_empty() { &["release", "daily"] } else { &[remote] };
    remotes.iter().find_map(|r| IMAGES.iter().find(|i| i.remote == *r && i.aliases.contains(&alias)).copied())
}

/// Whether multipassd knows `remote` (it has a host for it).
pub fn remote_known(remote: &str) -> bool {
    remote.is_empty() || IMAGES.iter().any(|i| i.remote == remote)
}

/// multipassd's refusal of a remote it has no image host for.
pub fn remote_not_found(remote: &str) -> Refusal {
    Refusal {
        code: Code::FailedPrecondition,
        message: format!(
            "Remote '{remote}' is not found. Please use `multipass find` for supported remotes and images."
        ),
    }
}

/// multipassd's refusal when it could not fetch a remote's manifest (no image server reachable).
pub fn remote_unreachable(remote: &str) -> Refusal {
    let message = if remote.is_empty() {
        "Remote \"\" is unknown or unreachable.".to_string()
    } else {
        format!(
            "Remote \"{remote}\" is unknown or unreachable. If image mirror is enabled, please confirm it is valid."
        )
    };
    Refusal { code: Code::FailedPrecondition, message }
}

fn failed(message: String) -> Refusal {
    Refusal { code: Code::FailedPrecondition, message }
}

/// Resolves a launch's `image` and `remote_name` as multipassd does, or refuses with its
/// message (always FAILED_PRECONDITION, as launch reports any exception). `servers_reachable`
/// false models a host without access to the image servers.
pub fn resolve(image: &str, remote: &str, servers_reachable: bool) -> Result<Resolved, Refusal> {
    if !remote.is_empty() && image.is_empty() {
        return Err(failed("Must specify an image when specifying a remote".into()));
    }
    if image.starts_with("file") {
        return local_file(image);
    }
    if image.starts_with("http") {
        let host = image.split("://").nth(1).and_then(|rest| rest.split(['/', ':']).next()).unwrap_or_default();
        return Err(failed(format!("failed to download from '{image}': Host {host} not found")));
    }
    if !remote_known(remote) {
        return Err(remote_not_found(remote));
    }
    if !servers_reachable {
        return Err(remote_unreachable(remote));
    }
    let alias = if image.is_empty() { "default" } else { image };
    if remote.is_empty()
        && let Some(b) = BLUEPRINTS.iter().find(|b| b.name == alias)
    {
        return Ok(Resolved::Blueprint(*b));
    }
    image_named(alias, remote)
        .map(Resolved::Image)
        .ok_or_else(|| failed(format!("Unable to find an image matching \"{image}\" in remote \"{remote}\".")))
}

/// A `file://` image: `file:///abs/path` (a host part is refused, as multipassd refuses it).
fn local_file(image: &str) -> Result<Resolved, Refusal> {
    let rest = image.strip_prefix("file://").unwrap_or(image.trim_start_matches("file:"));
    if !rest.starts_with('/') {
        return Err(failed(format!("Invalid file URL `{image}`; did you forget a slash?")));
    }
    let path = Path::new(rest);
    if !path.exists() {
        return Err(failed(format!("Custom image `{}` does not exist.", path.display())));
    }
    Ok(Resolved::File(path.to_path_buf()))
}

/// One `find` entry: the aliases (each with the remote it must be named with, "" for the
/// default remote) and the image's description.
fn entry(image: &CatalogueImage, aliases: &[&str], remote_name: &str) -> pb::find_reply::ImageInfo {
    pb::find_reply::ImageInfo {
        os: image.os.into(),
        release: image.release.into(),
        version: image.version.into(),
        aliases_info: aliases
            .iter()
            .map(|a| pb::find_reply::AliasInfo { remote_name: remote_name.into(), alias: (*a).into() })
            .collect(),
        codename: image.codename.into(),
    }
}

fn blueprint_entry(b: &Blueprint) -> pb::find_reply::ImageInfo {
    pb::find_reply::ImageInfo {
        os: String::new(),
        release: b.release.into(),
        version: "0.1".into(),
        aliases_info: vec![pb::find_reply::AliasInfo { remote_name: String::new(), alias: b.name.into() }],
        codename: String::new(),
    }
}

/// The aliases `find` lists (multipassd leaves out the internal `default`).
fn listed_aliases(image: &CatalogueImage) -> Vec<&'static str> {
    image.aliases.iter().copied().filter(|a| *a != "default").collect()
}

/// multipassd's `find` (`daemon.cpp` at v1.16.3) over the catalogue: with a search string, the
/// images it names (on the named remote, else the first remote that has it) and the blueprint
/// of that name; without, every image (aliases of the default remote carry no remote name) and
/// every blueprint; with only a remote, that remote's images.
pub fn find(req: &pb::FindRequest, servers_reachable: bool) -> Result<pb::FindReply, Refusal> {
    let mut reply =
        pb::FindReply { show_images: req.show_images, show_blueprints: req.show_blueprints, ..Default::default() };
    let remote = req.remote_name.as_str();
    if !remote_known(remote) {
        return Err(remote_not_found(remote));
    }
    let search = req.search_string.as_str();
    if !search.is_empty() {
        // A manifest that cannot be fetched is logged and yields nothing (multipassd catches it).
        if req.show_images && servers_reachable {
            let remotes: Vec<&str> = if remote.is_empty() { vec!["release", "daily"] } else { vec![remote] };
            let found = remotes.iter().find_map(|r| {
                let hits: Vec<&CatalogueImage> =
                    IMAGES.iter().filter(|i| i.remote == *r && i.aliases.contains(&search)).collect();
                (!hits.is_empty()).then_some(hits)
            });
            for image in found.unwrap_or_default() {
                let shown_remote = if remote.is_empty() && image.remote == DEFAULT_REMOTE { "" } else { image.remote };
                reply.images_info.push(entry(image, &[search], shown_remote));
            }
        }
        if req.show_blueprints && servers_reachable {
            reply.blueprints_info.extend(BLUEPRINTS.iter().filter(|b| b.name == search).map(blueprint_entry));
        }
        return Ok(reply);
    }
    if !remote.is_empty() {
        if !servers_reachable {
            return Err(remote_unreachable(remote));
        }
        for image in IMAGES.iter().filter(|i| i.remote == remote) {
            reply.images_info.push(entry(image, &listed_aliases(image), remote));
        }
        return Ok(reply);
    }
    if servers_reachable {
        if req.show_images {
            for image in IMAGES {
                let shown_remote = if image.remote == DEFAULT_REMOTE { "" } else { image.remote };
                reply.images_info.push(entry(image, &listed_aliases(image), shown_remote));
            }
        }
        if req.show_blueprints {
            reply.blueprints_info.extend(BLUEPRINTS.iter().map(blueprint_entry));
        }
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_remotes_and_blueprints_resolve() {
        assert!(matches!(resolve("", "", true), Ok(Resolved::Image(i)) if i.codename == "noble"));
        assert!(matches!(resolve("jammy", "", true), Ok(Resolved::Image(i)) if i.aliases[0] == "22.04"));
        assert!(matches!(resolve("devel", "daily", true), Ok(Resolved::Image(i)) if i.remote == "daily"));
        assert!(matches!(resolve("docker", "", true), Ok(Resolved::Blueprint(b)) if b.name == "docker"));
        let e = resolve("devel", "release", true).unwrap_err();
        assert_eq!(e.message, "Unable to find an image matching \"devel\" in remote \"release\".");
        let e = resolve("noble", "nosuch", true).unwrap_err();
        assert!(e.message.starts_with("Remote 'nosuch' is not found."), "{}", e.message);
        assert_eq!(resolve("", "", false).unwrap_err().message, "Remote \"\" is unknown or unreachable.");
        assert_eq!(resolve("", "daily", true).unwrap_err().message, "Must specify an image when specifying a remote");
    }

    #[test]
    fn find_follows_multipassd() {
        let all = pb::FindRequest { show_images: true, show_blueprints: true, ..Default::default() };
        let r = find(&all, true).unwrap();
        assert_eq!(r.images_info.len(), IMAGES.len());
        let noble = &r.images_info[2];
        assert_eq!(noble.aliases_info[0].remote_name, "", "the default remote is not named");
        assert!(noble.aliases_info.iter().all(|a| a.alias != "default"));
        assert!(r.images_info.iter().any(|i| i.aliases_info[0].remote_name == "daily"));
        assert_eq!(r.blueprints_info.len(), BLUEPRINTS.len());
        let one = pb::FindRequest { search_string: "devel".into(), show_images: true, ..Default::default() };
        let r = find(&one, true).unwrap();
        assert_eq!(r.images_info.len(), 1);
        assert_eq!(r.images_info[0].aliases_info[0].remote_name, "daily");
        let none = pb::FindRequest { search_string: "nosuch".into(), show_images: true, ..Default::default() };
        assert!(find(&none, true).unwrap().images_info.is_empty());
        let bad = pb::FindRequest { remote_name: "x".into(), ..Default::default() };
        assert!(find(&bad, true).unwrap_err().message.contains("is not found"));
        assert!(find(&all, false).unwrap().images_info.is_empty(), "no manifests without image servers");
    }

    #[test]
    fn urls_and_files() {
        let e = resolve("https://example.com/x.img", "", true).unwrap_err();
        assert!(e.message.starts_with("failed to download from 'https://example.com/x.img'"), "{}", e.message);
        let e = resolve("file:///nonexistent/x.img", "", true).unwrap_err();
        assert_eq!(e.message, "Custom image `/nonexistent/x.img` does not exist.");
        let e = resolve("file://tmp/x.img", "", true).unwrap_err();
        assert!(e.message.contains("did you forget a slash?"), "{}", e.message);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.img");
        std::fs::write(&img, b"qcow").unwrap();
        let url = format!("file://{}", img.display());
        assert_eq!(resolve(&url, "", false), Ok(Resolved::File(img)));
    }
}
