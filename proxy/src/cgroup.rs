//! `--local --cgroup PATH`: cgroup v2 paths as `iptables -m cgroup --path` takes them, and
//! what the cgroup programs need to know about the agent itself.
//!
//! A path is absolute under the cgroup2 mount (`/sys/fs/cgroup/app.slice`) or relative to it
//! (`app.slice`, `/app.slice`), like xt_cgroup's. The mount is read from `/proc/mounts`
//! (`/sys/fs/cgroup` on most hosts, `/sys/fs/cgroup/unified` on hybrid ones). Under
//! `ip netns exec`, whose mount namespace has a fresh /sys without the cgroup mounts, the
//! agent mounts the (one) cgroup2 hierarchy at that /sys's empty `/sys/fs/cgroup`, which
//! only its own mount namespace sees. A cgroup's id, which
//! `bpf_get_current_ancestor_cgroup_id` returns, is its directory's inode.

use std::{
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Component, Path, PathBuf},
};

/// A cgroup path that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 file system is mounted.
    #[error("no cgroup2 file system in /proc/mounts (cgroup v2 is needed for --local)")]
    NoMount,
    /// `/proc/mounts` or `/proc/self/cgroup` could not be read.
    #[error("reading {0}")]
    Read(&'static str, #[source] io::Error),
    /// The path does not name a cgroup.
    #[error("{path}: not a cgroup under {mount}")]
    NotACgroup {
        path: String,
        mount: String,
        #[source]
        source: io::Error,
    },
    /// Mounting the cgroup2 hierarchy failed.
    #[error("mounting cgroup2 at {0}")]
    Mount(&'static str, #[source] nix::Error),
    /// The path leaves the hierarchy (`..`).
    #[error("{0}: '..' is not allowed in a cgroup path")]
    Parent(String),
}

/// A cgroup of the v2 hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// The path as the user wrote it, for messages.
    pub name: String,
    /// Where it is in the file system.
    pub dir: PathBuf,
    /// Its id: the directory's inode.
    pub id: u64,
    /// Its depth below the root (the root is level 0).
    pub level: u32,
}

impl Cgroup {
    /// Resolves `path` (absolute under the cgroup2 mount, or relative to it).
    pub fn resolve(path: &str) -> Result<Self, CgroupError> {
        let Mount {
            usable: mount,
            named,
        } = find_mount()?;
        let relative = Path::new(path)
            .strip_prefix(&named)
            .or_else(|_| Path::new(path).strip_prefix(&mount))
            .unwrap_or(Path::new(path));
        let mut dir = mount.clone();
        let mut level = 0;
        for component in relative.components() {
            match component {
                Component::Normal(part) => {
                    dir.push(part);
                    level += 1;
                }
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(CgroupError::Parent(path.to_owned()));
                }
            }
        }
        let not_a_cgroup = |source| CgroupError::NotACgroup {
            path: path.to_owned(),
            mount: mount.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(&dir).map_err(not_a_cgroup)?;
        // Every cgroup directory has this file; an ordinary directory does not.
        std::fs::metadata(dir.join("cgroup.procs")).map_err(not_a_cgroup)?;
        Ok(Cgroup {
            name: path.to_owned(),
            dir,
            id: meta.ino(),
            level,
        })
    }

    /// The root of the hierarchy.
    pub fn root() -> Result<Self, CgroupError> {
        Self::resolve("/")
    }

    /// The calling process's own cgroup (`0::/path` in `/proc/self/cgroup`).
    pub fn own() -> Result<Self, CgroupError> {
        let text = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| CgroupError::Read("/proc/self/cgroup", e))?;
        let path = text
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or(CgroupError::NoMount)?;
        Self::resolve(path)
    }

    /// Whether `self` is `other` or below it.
    pub fn is_within(&self, other: &Cgroup) -> bool {
        self.dir.starts_with(&other.dir)
    }
}

/// The cgroups to attach to: `cgroups` without those inside another of them (a program
/// attached at a cgroup runs for its descendants too; attached twice it would run twice).
pub fn outermost(cgroups: &[Cgroup]) -> Vec<Cgroup> {
    let mut out: Vec<Cgroup> = Vec::new();
    for (i, c) in cgroups.iter().enumerate() {
        let inside_another = cgroups
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && c.is_within(o) && (c.dir != o.dir || j < i));
        if !inside_another {
            out.push(c.clone());
        }
    }
    out
}

/// Where the cgroup2 file system is mounted, from `/proc/mounts`: the path to use in
/// this mount namespace (see [`find_mount`]).
pub fn mount() -> Result<PathBuf, CgroupError> {
    find_mount().map(|m| m.usable)
}

/// The cgroup2 mount.
struct Mount {
    /// Where to reach it from here.
    usable: PathBuf,
    /// Where its mount namespace has it (what absolute `--cgroup` paths start with).
    named: PathBuf,
}

/// This mount namespace's cgroup2 mount. None, and `/sys/fs/cgroup` is no mount point (a
/// fresh /sys, as `ip netns exec` makes): the hierarchy is mounted there. On a host
/// without cgroup2 (`/sys/fs/cgroup` a tmpfs of v1 hierarchies) nothing is mounted.
fn find_mount() -> Result<Mount, CgroupError> {
    const DEFAULT: &str = "/sys/fs/cgroup";
    if let Some(dir) = cgroup2_in("/proc/self/mounts")? {
        return Ok(Mount {
            usable: dir.clone(),
            named: dir,
        });
    }
    let text = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| CgroupError::Read("/proc/self/mounts", e))?;
    let default_is_mounted = text
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(DEFAULT));
    if default_is_mounted || !Path::new(DEFAULT).is_dir() {
        return Err(CgroupError::NoMount);
    }
    nix::mount::mount(
        Some("cgroup2"),
        DEFAULT,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| CgroupError::Mount(DEFAULT, e))?;
    log::info!(
        "cgroup2 mounted at {DEFAULT}: this mount namespace had none (a fresh /sys, as under \
         ip netns exec)"
    );
    // Absolute `--cgroup` paths name the host's mount point; they are taken relative.
    let named = cgroup2_in("/proc/1/mounts")
        .ok()
        .flatten()
        .unwrap_or_else(|| PathBuf::from(DEFAULT));
    Ok(Mount {
        usable: PathBuf::from(DEFAULT),
        named,
    })
}

/// The first cgroup2 mount point listed in `mounts`.
fn cgroup2_in(mounts: &'static str) -> Result<Option<PathBuf>, CgroupError> {
    let text = std::fs::read_to_string(mounts).map_err(|e| CgroupError::Read(mounts, e))?;
    Ok(text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(dir)))
    }))
}

/// `/proc/mounts` writes spaces and a few other bytes as octal escapes (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && let Some(v) = std::str::from_utf8(octal)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The calling thread's network namespace cookie (`SO_NETNS_COOKIE`), which the cgroup
/// programs compare with `bpf_get_netns_cookie` of each socket.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgroup(dir: &str) -> Cgroup {
        Cgroup {
            name: dir.to_owned(),
            dir: PathBuf::from(dir),
            id: 0,
            level: 0,
        }
    }

    #[test]
    fn nested_and_repeated_cgroups_collapse_to_the_outermost() {
        let list = [
            cgroup("/cg/a/b"),
            cgroup("/cg/a"),
            cgroup("/cg/ab"),
            cgroup("/cg/a"),
        ];
        let out: Vec<String> = outermost(&list).into_iter().map(|c| c.name).collect();
        assert_eq!(out, ["/cg/a", "/cg/ab"]);
    }

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
    }
}
