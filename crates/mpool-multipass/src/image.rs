//! Images as multipass takes them: `[remote:]image` (`release:24.04`, `daily:noble`, an alias
//! such as `lts` or `jammy`, a blueprint such as `docker`), `file:///path/to.img` and
//! `http(s)://` URLs; split into the request's `image` and `remote_name` exactly as the
//! multipass CLI's `launch` does (`launch.cpp` at v1.16.3), and checked against a daemon.

use std::path::PathBuf;

use super::{Client, ClientOptions, Error};

/// An image reference, split as the multipass CLI splits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// What goes into `LaunchRequest.image` (the whole URL for URLs; empty: the default).
    pub image: String,
    /// What goes into `LaunchRequest.remote_name` (empty: any remote, `release` first).
    pub remote: String,
}

/// What kind of image a reference names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// The daemon's default image (the current LTS).
    Default,
    /// A name the daemon looks up: a release, alias or blueprint, on `remote` if one is named.
    Named,
    /// A local image file (`file:///path`), read by the daemon on its host.
    File(PathBuf),
    /// An image the daemon downloads (`http://`, `https://`).
    Url,
}

impl ImageRef {
    /// Parses `[remote:]image`, `file://...` or `http(s)://...`. More than one colon outside a
    /// URL, or a remote without an image, is refused (the CLI and the daemon refuse them).
    pub fn parse(s: &str) -> Result<ImageRef, Error> {
        if ["http://", "https://", "file://"].iter().any(|p| s.starts_with(p)) {
            return Ok(ImageRef { image: s.to_string(), remote: String::new() });
        }
        match s.split(':').count() {
            1 => Ok(ImageRef { image: s.to_string(), remote: String::new() }),
            2 => {
                let (remote, image) = s.split_once(':').unwrap_or(("", s));
                if image.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "image {s:?}: a remote needs an image after it, e.g. `{remote}:24.04`"
                    )));
                }
                Ok(ImageRef { image: image.to_string(), remote: remote.to_string() })
            }
            _ => Err(Error::InvalidArgument(format!(
                "image {s:?}: invalid remote and source image name supplied; expected \
                 `[remote:]image`, `file:///path` or an `http(s)://` URL"
            ))),
        }
    }

    /// What kind of image this is.
    pub fn kind(&self) -> ImageKind {
        if let Some(path) = self.image.strip_prefix("file://") {
            return ImageKind::File(PathBuf::from(path));
        }
        if self.image.starts_with("http://") || self.image.starts_with("https://") {
            return ImageKind::Url;
        }
        if self.image.is_empty() { ImageKind::Default } else { ImageKind::Named }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.remote.is_empty(), self.image.is_empty()) {
            (true, true) => write!(f, "the default image"),
            (true, false) => write!(f, "{}", self.image),
            (false, _) => write!(f, "{}:{}", self.remote, self.image),
        }
    }
}

/// Whether a daemon can launch an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageCheck {
    /// Known: what the daemon (or the file system) says it is.
    Known(String),
    /// Not known to the daemon, with why.
    Unknown(String),
    /// Cannot be checked before a launch (URLs are downloaded then).
    NotChecked(String),
}

impl Client {
    /// Tells whether the daemon can launch `image` (as multipass takes it): names are looked
    /// up with `find` (images and blueprints), a `file://` image must exist on this host (the
    /// daemon's), URLs cannot be checked before they are downloaded.
    pub async fn check_image(&self, image: &str) -> Result<ImageCheck, Error> {
        let r = match ImageRef::parse(image) {
            Ok(r) => r,
            Err(e) => return Ok(ImageCheck::Unknown(e.to_string())),
        };
        match r.kind() {
            ImageKind::Url => Ok(ImageCheck::NotChecked("a URL is downloaded when a VM is launched".into())),
            ImageKind::File(path) if path.is_file() => Ok(ImageCheck::Known(format!("local image {}", path.display()))),
            ImageKind::File(path) => {
                Ok(ImageCheck::Unknown(format!("Custom image `{}` does not exist.", path.display())))
            }
            ImageKind::Default => {
                let found = self.find("", true, false, false).await?;
                Ok(match found.images.first() {
                    Some(_) => ImageCheck::Known("the daemon's default image".into()),
                    None => ImageCheck::Unknown("multipassd lists no images (can it reach its image servers?)".into()),
                })
            }
            ImageKind::Named => {
                let search = if r.remote.is_empty() { r.image.clone() } else { format!("{}:{}", r.remote, r.image) };
                let found = match self.find(&search, true, true, false).await {
                    Ok(f) => f,
                    Err(e @ Error::Daemon { .. }) => return Ok(ImageCheck::Unknown(e.to_string())),
                    Err(e) => return Err(e),
                };
                let describe = |e: &super::ImageEntry| {
                    if e.os.is_empty() { e.release.clone() } else { format!("{} {}", e.os, e.release) }
                };
                if let Some(e) = found.images.first() {
                    return Ok(ImageCheck::Known(describe(e)));
                }
                if let Some(b) = found.blueprints.first() {
                    return Ok(ImageCheck::Known(format!("blueprint: {}", describe(b))));
                }
                Ok(ImageCheck::Unknown(format!(
                    "multipassd knows no image or blueprint {r} (`mpool multipass find` lists what it \
                     knows; its image servers may also be unreachable)"
                )))
            }
        }
    }
}

/// Connects to the daemon of `opts` and checks each `(pool, image)`: what `mpool serve
/// --check` reports. Errors only when the daemon cannot be asked at all.
pub async fn check_pool_images(
    opts: &ClientOptions,
    pools: &[(String, String)],
) -> Result<Vec<(String, String, ImageCheck)>, Error> {
    let client = Client::connect(opts.clone()).await?;
    let mut out = Vec::with_capacity(pools.len());
    for (pool, image) in pools {
        out.push((pool.clone(), image.clone(), client.check_image(image).await?));
    }
    Ok(out)
}

/// `mpool serve --check`'s image part: connects (once, with a short deadline) and prints, per
/// pool, whether multipassd can launch its image. Exit code 2 when an image is unknown; an
/// unreachable daemon is reported but does not fail the check (serve waits for it).
pub async fn serve_check_images(
    opts: Result<ClientOptions, String>,
    pools: &[(String, String)],
) -> std::process::ExitCode {
    let mut opts = match opts {
        Ok(o) => o,
        Err(e) => {
            println!("images not checked: {e}");
            return std::process::ExitCode::SUCCESS;
        }
    };
    opts.connect_timeout = opts.connect_timeout.min(std::time::Duration::from_secs(5));
    opts.call_timeout = opts.call_timeout.min(std::time::Duration::from_secs(30));
    let checks = match check_pool_images(&opts, pools).await {
        Ok(c) => c,
        Err(e) => {
            println!("images not checked: {e}");
            return std::process::ExitCode::SUCCESS;
        }
    };
    let mut unknown = false;
    for (pool, image, check) in checks {
        let image = if image.is_empty() { "(default)".to_string() } else { image };
        match check {
            ImageCheck::Known(what) => println!("pool {pool}: image {image}: known ({what})"),
            ImageCheck::NotChecked(why) => {
                println!("pool {pool}: image {image}: not checked ({why})")
            }
            ImageCheck::Unknown(why) => {
                unknown = true;
                println!("pool {pool}: image {image}: UNKNOWN to multipassd: {why}");
            }
        }
    }
    if unknown { std::process::ExitCode::from(2) } else { std::process::ExitCode::SUCCESS }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> (String, String) {
        let r = ImageRef::parse(s).unwrap();
        (r.remote, r.image)
    }

    #[test]
    fn splits_like_the_multipass_cli() {
        assert_eq!(split("24.04"), ("".into(), "24.04".into()));
        assert_eq!(split("release:24.04"), ("release".into(), "24.04".into()));
        assert_eq!(split("daily:noble"), ("daily".into(), "noble".into()));
        assert_eq!(split(""), ("".into(), "".into()));
        assert_eq!(split(":noble"), ("".into(), "noble".into()));
        assert_eq!(split("file:///tmp/x.img"), ("".into(), "file:///tmp/x.img".into()));
        assert_eq!(split("https://h:8080/x.img"), ("".into(), "https://h:8080/x.img".into()));
        assert!(ImageRef::parse("a:b:c").is_err());
        assert!(ImageRef::parse("daily:").is_err());
        assert_eq!(ImageRef::parse("file:///tmp/x.img").unwrap().kind(), ImageKind::File("/tmp/x.img".into()));
        assert_eq!(ImageRef::parse("http://h/x").unwrap().kind(), ImageKind::Url);
        assert_eq!(ImageRef::parse("").unwrap().kind(), ImageKind::Default);
        assert_eq!(ImageRef::parse("docker").unwrap().kind(), ImageKind::Named);
    }
}
