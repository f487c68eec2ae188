//! Real disks that fail: a small tmpfs that fills up, and an ext2 file system on a loop
//! device whose backing file lives on a small tmpfs, so that once the backing tmpfs is full
//! every write-back fails with a real block-device I/O error (`EIO` from `fsync`).
//!
//! Mounting needs root (or `CAP_SYS_ADMIN`); where it is not permitted the test prints one
//! line saying so and passes without checking anything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Result<(), String> {
    let options = format!("size={size}");
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &options,
            "tmpfs",
            &dir.display().to_string(),
        ],
    )
    .map(drop)
}

fn umount(dir: &Path) {
    if let Err(e) = run("umount", &[&dir.display().to_string()]) {
        eprintln!("warning: {e}");
    }
}

/// Fills the file system of `dir` with a ballast file until it has no room left.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("ballast");
    let mut file = std::fs::File::create(&path).expect("the ballast file");
    for chunk in [64 * 1024, 4096, 512] {
        let bytes = vec![0u8; chunk];
        while file.write_all(&bytes).and_then(|()| file.flush()).is_ok() {}
    }
    path
}

/// A small tmpfs mounted on a temporary directory, unmounted when dropped.
pub struct SmallTmpfs {
    dir: tempfile::TempDir,
    ballast: Option<PathBuf>,
}

impl SmallTmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=...`); `None` (after printing why) where
    /// mounting is not permitted.
    pub fn mount(size: &str, test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("a mount point");
        match mount_tmpfs(dir.path(), size) {
            Ok(()) => Some(SmallTmpfs { dir, ballast: None }),
            Err(e) => {
                eprintln!("skipped {test}: cannot mount a tmpfs here ({e})");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Takes what room is left.
    pub fn fill(&mut self) {
        self.ballast = Some(fill(self.dir.path()));
    }

    /// Gives the room back.
    pub fn free(&mut self) {
        if let Some(ballast) = self.ballast.take() {
            std::fs::remove_file(ballast).expect("removing the ballast");
        }
    }

    /// Remounts it read-only (`mount -o remount,ro`).
    pub fn remount_read_only(&self) -> Result<(), String> {
        run(
            "mount",
            &["-o", "remount,ro", &self.dir.path().display().to_string()],
        )
        .map(drop)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        umount(self.dir.path());
    }
}

/// An ext2 file system on a loop device whose backing file is larger than the tmpfs that
/// holds it: once that tmpfs is full, writes to the device fail with I/O errors.
pub struct FailingDisk {
    backing: SmallTmpfs,
    mount: tempfile::TempDir,
    device: String,
    mounted: bool,
}

impl FailingDisk {
    /// `None` (after printing why) where mounting or loop devices are not available.
    pub fn new(test: &str) -> Option<Self> {
        let backing = SmallTmpfs::mount("8M", test)?;
        let image = backing.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(32 * 1024 * 1024))
            .expect("the sparse disk image");
        let device = match run("losetup", &["-f", "--show", &image.display().to_string()]) {
            Ok(device) => device,
            Err(e) => {
                eprintln!("skipped {test}: no loop device ({e})");
                return None;
            }
        };
        let mount = tempfile::tempdir().expect("a mount point");
        let mut disk = FailingDisk {
            backing,
            mount,
            device,
            mounted: false,
        };
        let dir = disk.mount.path().display().to_string();
        let made = run("mkfs.ext2", &["-q", "-E", "nodiscard", &disk.device])
            .and_then(|_| run("mount", &["-o", "errors=continue", &disk.device, &dir]));
        match made {
            Ok(_) => {
                disk.mounted = true;
                Some(disk)
            }
            Err(e) => {
                eprintln!("skipped {test}: cannot make a file system on a loop device ({e})");
                None
            }
        }
    }

    /// The mounted file system.
    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Fills the backing tmpfs: from now on, writing back to the device fails.
    pub fn break_writes(&mut self) {
        self.backing.fill();
    }

    /// Frees the backing tmpfs: the device works again.
    pub fn mend(&mut self) {
        self.backing.free();
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        self.backing.free();
        if self.mounted {
            umount(self.mount.path());
        }
        if let Err(e) = run("losetup", &["-d", &self.device]) {
            eprintln!("warning: {e}");
        }
    }
}
