//! File access confined to a directory, race-free: every path is resolved by the kernel
//! relative to a descriptor of the directory with `openat2(RESOLVE_BENEATH)`, so a symlink
//! anywhere in it (also one swapped in while the call runs) cannot lead out of it; operations
//! on a last component that must not follow links (lstat, remove, rename, mkdir, readlink) are
//! done with `*at` calls on a descriptor of the (confined) parent directory.
//!
//! The simulator's SFTP server serves each instance's directory through a [`Confined`] root:
//! what a task in one simulated VM links or swaps never reaches the host or another VM.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// A directory that paths are resolved beneath.
#[derive(Debug)]
pub struct Confined {
    /// Its canonical absolute path (SFTP clients may name files by it).
    path: PathBuf,
    /// An `O_PATH` descriptor of it: resolution starts here.
    fd: OwnedFd,
}

/// How `open` opens a file (SFTP's open flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    /// Read.
    pub read: bool,
    /// Write.
    pub write: bool,
    /// Append.
    pub append: bool,
    /// Create if missing.
    pub create: bool,
    /// Create, failing if it exists.
    pub create_new: bool,
    /// Truncate.
    pub truncate: bool,
    /// Permission bits of a created file.
    pub mode: u32,
}

/// The error for a path that leads out of the directory.
pub fn outside() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "path is outside the instance's directory")
}

fn cstring(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A relative path as the kernel takes it ("." for the directory itself).
fn rel_cstring(rel: &Path) -> io::Result<CString> {
    if rel.as_os_str().is_empty() { cstring(OsStr::new(".")) } else { cstring(rel.as_os_str()) }
}

/// Maps a failed system call's errno; an escape (EXDEV from `RESOLVE_BENEATH`, ELOOP from a
/// refused magic link) reads as "outside the instance's directory".
fn last_error() -> io::Error {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EXDEV) => outside(),
        Some(libc::ENOSYS) => io::Error::new(
            io::ErrorKind::Unsupported,
            "openat2 is not available (Linux 5.6+ is needed to confine file access)",
        ),
        _ => e,
    }
}

impl Confined {
    /// Opens `path` (an existing directory) as the root of confinement.
    pub fn open(path: &Path) -> io::Result<Confined> {
        let path = std::fs::canonicalize(path)?;
        let c = cstring(path.as_os_str())?;
        // SAFETY: a valid NUL-terminated path; the returned descriptor is checked.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Confined { path, fd })
    }

    /// The directory's canonical path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path relative to the directory that an SFTP path names, lexically: relative paths
    /// start at the directory, absolute ones must lie in it, `.` and `..` are removed (`..`
    /// never climbs above `/`). Symlinks are not looked at here; the kernel resolves them,
    /// confined, when the path is used.
    pub fn relative(&self, raw: &str) -> io::Result<PathBuf> {
        if raw.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"));
        }
        let joined = if raw.starts_with('/') { PathBuf::from(raw) } else { self.path.join(raw) };
        let mut lexical = PathBuf::from("/");
        for component in joined.components() {
            match component {
                Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
                Component::ParentDir => {
                    lexical.pop();
                }
                Component::Normal(name) => lexical.push(name),
            }
        }
        lexical.strip_prefix(&self.path).map(Path::to_path_buf).map_err(|_| outside())
    }

    /// `openat2` beneath the directory.
    fn openat2(&self, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let c = rel_cstring(rel)?;
        // SAFETY: `open_how` is plain integers: all-zero is a valid value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        // openat2 refuses a mode unless it creates.
        if flags & libc::O_CREAT != 0 {
            how.mode = u64::from(mode);
        }
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: valid pointers to a NUL-terminated path and an `open_how` of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(last_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Opens a file (following links, confined) as `how` says.
    pub fn open_file(&self, rel: &Path, how: OpenMode) -> io::Result<File> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "invalid open flags");
        let mut flags = match (how.read, how.write || how.append) {
            (true, false) => libc::O_RDONLY,
            (false, true) => libc::O_WRONLY,
            (true, true) => libc::O_RDWR,
            (false, false) => return Err(invalid()),
        };
        if how.append {
            flags |= libc::O_APPEND;
        }
        if (how.create || how.create_new || how.truncate) && !(how.write || how.append) {
            return Err(invalid());
        }
        if how.create_new {
            flags |= libc::O_CREAT | libc::O_EXCL;
        } else if how.create {
            flags |= libc::O_CREAT;
        }
        if how.truncate {
            flags |= libc::O_TRUNC;
        }
        Ok(File::from(self.openat2(rel, flags, how.mode)?))
    }

    /// An `O_PATH` descriptor of `rel`; `follow` decides whether a last component that is a
    /// symlink is resolved (confined) or meant itself.
    fn path_fd(&self, rel: &Path, follow: bool) -> io::Result<OwnedFd> {
        let flags = libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW };
        self.openat2(rel, flags, 0)
    }

    /// The attributes of `rel` (of a last-component symlink itself without `follow`).
    pub fn metadata(&self, rel: &Path, follow: bool) -> io::Result<Metadata> {
        File::from(self.path_fd(rel, follow)?).metadata()
    }

    /// A path through `/proc/self/fd` that reaches exactly the file `fd` holds (for calls
    /// that take a path: chmod, truncate, utimes, readdir), never re-resolving the original.
    fn fd_path(fd: &OwnedFd) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// Runs `f` on a path that reaches `rel` (followed, confined) and nothing else.
    pub fn with_resolved<T>(&self, rel: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
        let fd = self.path_fd(rel, true)?;
        f(&Self::fd_path(&fd))
    }

    /// Opens a directory for listing: the handle (for its attributes) and its entries.
    pub fn read_dir(&self, rel: &Path) -> io::Result<(File, std::fs::ReadDir)> {
        let dir = File::from(self.openat2(rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)?);
        let fd = OwnedFd::from(dir.try_clone()?);
        let entries = std::fs::read_dir(Self::fd_path(&fd))?;
        Ok((dir, entries))
    }

    /// The confined parent directory of `rel` and its last component (refused for the
    /// directory itself).
    fn parent(&self, rel: &Path) -> io::Result<(OwnedFd, CString)> {
        let name = rel.file_name().ok_or_else(outside)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        let fd = self.openat2(parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok((fd, cstring(name)?))
    }

    /// Removes a file (or a symlink itself).
    pub fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        // SAFETY: a valid directory descriptor and NUL-terminated name.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
            return Err(last_error());
        }
        Ok(())
    }

    /// Removes an empty directory (never the root).
    pub fn remove_dir(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        // SAFETY: as above.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } < 0 {
            return Err(last_error());
        }
        Ok(())
    }

    /// Makes a directory.
    pub fn create_dir(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        // SAFETY: as above.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) } < 0 {
            return Err(last_error());
        }
        Ok(())
    }

    /// Renames `from` to `to` (the entries themselves; links are not followed).
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        // SAFETY: valid descriptors and NUL-terminated names.
        let r =
            unsafe { libc::renameat(from_dir.as_raw_fd(), from_name.as_ptr(), to_dir.as_raw_fd(), to_name.as_ptr()) };
        if r < 0 {
            return Err(last_error());
        }
        Ok(())
    }

    /// A symlink's target, as written.
    pub fn read_link(&self, rel: &Path) -> io::Result<PathBuf> {
        let (dir, name) = self.parent(rel)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: a valid descriptor, name, and a buffer of the length given.
        let n = unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(last_error());
        }
        buf.truncate(usize::try_from(n).unwrap_or(0));
        Ok(PathBuf::from(OsString::from_vec(buf)))
    }

    /// The canonical host path of `rel` (links resolved, confined); for a missing last
    /// component, its confined parent's path joined with the name.
    pub fn real_path(&self, rel: &Path) -> io::Result<PathBuf> {
        match self.path_fd(rel, true) {
            Ok(fd) => std::fs::read_link(Self::fd_path(&fd)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let name = rel.file_name().ok_or(e)?;
                let parent = self.path_fd(rel.parent().unwrap_or(Path::new("")), true)?;
                Ok(std::fs::read_link(Self::fd_path(&parent))?.join(name))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root() -> (tempfile::TempDir, Confined) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let root = Confined::open(&dir.path().join("root")).unwrap();
        (dir, root)
    }

    fn read(root: &Confined, raw: &str) -> io::Result<String> {
        let rel = root.relative(raw)?;
        let mut f = root.open_file(&rel, OpenMode { read: true, ..Default::default() })?;
        let mut s = String::new();
        io::Read::read_to_string(&mut f, &mut s)?;
        Ok(s)
    }

    #[test]
    fn paths_map_lexically_into_the_root() {
        let (_dir, root) = temp_root();
        assert_eq!(root.relative("").unwrap(), PathBuf::new());
        assert_eq!(root.relative(".").unwrap(), PathBuf::new());
        assert_eq!(root.relative("sub/f").unwrap(), PathBuf::from("sub/f"));
        assert_eq!(root.relative("sub/../new").unwrap(), PathBuf::from("new"));
        let abs = root.path().join("sub/f");
        assert_eq!(root.relative(abs.to_str().unwrap()).unwrap(), PathBuf::from("sub/f"));
        for bad in ["..", "../x", "sub/../../x", "/etc/passwd", "/", "a\0b"] {
            let err = root.relative(bad).unwrap_err();
            assert!(
                matches!(err.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput),
                "{bad}: {err}"
            );
        }
        let sibling = format!("{}2/x", root.path().display());
        assert!(root.relative(&sibling).is_err(), "a sibling sharing the root's prefix is outside");
    }

    #[test]
    fn links_are_followed_only_inside() {
        let (dir, root) = temp_root();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "out").unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::fs::write(root.path().join("sub/f"), "in").unwrap();
        std::os::unix::fs::symlink(&outside, root.path().join("out")).unwrap();
        std::os::unix::fs::symlink("sub", root.path().join("in")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", root.path().join("rel-out")).unwrap();
        std::os::unix::fs::symlink(root.path().join("sub/f"), root.path().join("abs-in")).unwrap();

        assert_eq!(read(&root, "in/f").unwrap(), "in");
        for escape in ["out/secret", "rel-out", "abs-in"] {
            let err = read(&root, escape).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{escape}: {err}");
        }
        // The link itself is inside: lstat, readlink and remove name it.
        assert!(root.metadata(Path::new("out"), false).unwrap().file_type().is_symlink());
        assert_eq!(root.read_link(Path::new("out")).unwrap(), outside);
        assert!(root.metadata(Path::new("out"), true).is_err());
        // Creating through a link out of the root is refused.
        let w = OpenMode { write: true, create: true, mode: 0o644, ..Default::default() };
        assert!(root.open_file(Path::new("out/new"), w).is_err());
        assert!(!outside.join("new").exists());
        root.remove_file(Path::new("out")).unwrap();
        assert!(outside.exists(), "removing the link leaves its target");
        assert_eq!(root.real_path(Path::new("in/f")).unwrap(), root.path().join("sub/f"));
        assert_eq!(root.real_path(Path::new("in/new")).unwrap(), root.path().join("sub/new"));
        assert!(root.remove_dir(Path::new("")).is_err(), "the root itself cannot be removed");
    }
}
