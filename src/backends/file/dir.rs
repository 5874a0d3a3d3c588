//! The lock directory, reached through one descriptor opened at start, and the entries in
//! it opened relative to that descriptor, never following a symbolic link.
//!
//! A lock directory may be shared by a group, so any member can plant anything under a
//! key's name: a link to a file root owns, a dangling link whose target an open with
//! `O_CREAT` would create, a FIFO that blocks readers, a hard link to a foreign file.
//! Every entry is therefore opened with `O_NOFOLLOW` relative to the directory
//! descriptor, and refused unless `fstat` on the open descriptor shows a regular file
//! with a single name. The checks run on the open descriptor, not the name, so that
//! swapping the entry between check and use changes nothing: what was checked is what is
//! written.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Lock and fence files are created `0664` minus the umask: group members sharing the
/// directory (umask 002) can lock and write them, others can only read them, as with a
/// file flock(1) creates (which uses `0666`; others need no write access here).
const FILE_MODE: libc::mode_t = 0o664;

/// Why an entry of the lock directory cannot be used.
#[derive(Debug)]
pub(crate) enum OpenError {
    Io(io::Error),
    /// Something other than a lock file of its own is under that name.
    Refused(&'static str),
}

impl From<io::Error> for OpenError {
    fn from(err: io::Error) -> Self {
        OpenError::Io(err)
    }
}

/// How an entry is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read and write, creating the file if it is missing (taking a lock).
    Create,
    /// Read only, never creating (status, list, force-release).
    Inspect,
}

#[derive(Debug)]
pub(crate) struct LockDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn fstat(fd: libc::c_int) -> io::Result<libc::stat> {
    // SAFETY: fstat fills a zeroed stat for a descriptor this module owns.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

fn file_type(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "it is a directory, not a regular file",
        libc::S_IFIFO => "it is a FIFO, not a regular file",
        libc::S_IFSOCK => "it is a socket, not a regular file",
        libc::S_IFCHR | libc::S_IFBLK => "it is a device, not a regular file",
        libc::S_IFLNK => "it is a symbolic link; dlock never follows links in a lock directory",
        _ => "it is not a regular file",
    }
}

/// Why a lock directory could not be opened.
#[derive(Debug)]
pub(crate) enum DirError {
    /// A directory above the lock directory does not exist (the first missing one).
    MissingParent(std::path::PathBuf),
    /// Any other failure.
    Io(io::Error),
}

impl From<io::Error> for DirError {
    fn from(err: io::Error) -> Self {
        DirError::Io(err)
    }
}

impl LockDir {
    /// Opens the directory, creating it private to the user if it does not exist: only
    /// its last component, unless `parents` (the default directory), so that a mistyped
    /// path is an error rather than a new directory nobody else locks in. Links in the
    /// configured path itself are followed: that path is the operator's choice
    /// (`/var/lock` is a link to `/run/lock` on Debian); only entries inside it are
    /// untrusted. An existing directory's mode is never changed.
    pub(crate) fn open(path: &Path, parents: bool) -> Result<LockDir, DirError> {
        if let Err(err) = std::fs::DirBuilder::new()
            .recursive(parents)
            .mode(0o700)
            .create(path)
        {
            match err.kind() {
                // `create` fails on an existing non-directory; report what open says of it.
                io::ErrorKind::AlreadyExists => {}
                io::ErrorKind::NotFound if !parents => {
                    let mut missing = path;
                    while let Some(parent) = missing.parent() {
                        if parent.as_os_str().is_empty() || parent.exists() {
                            break;
                        }
                        missing = parent;
                    }
                    return Err(DirError::MissingParent(missing.to_path_buf()));
                }
                _ => return Err(DirError::Io(err)),
            }
        }
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: open on a NUL-terminated path; the descriptor is owned at once.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(DirError::Io(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(LockDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the entry `name` of the directory if it is a regular file with one name.
    pub(crate) fn open_file(&self, name: &str, access: Access) -> Result<File, OpenError> {
        let c = c_name(name)?;
        let common = libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
        let flags = match access {
            Access::Create => common | libc::O_RDWR | libc::O_CREAT,
            Access::Inspect => common | libc::O_RDONLY,
        };
        // SAFETY: openat relative to the directory descriptor on a NUL-terminated name;
        // the descriptor is owned at once.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags,
                libc::c_uint::from(FILE_MODE),
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                // O_NOFOLLOW on a link, dangling or not.
                Some(libc::ELOOP) => OpenError::Refused(file_type(libc::S_IFLNK)),
                Some(libc::EISDIR) => OpenError::Refused(file_type(libc::S_IFDIR)),
                // A socket cannot be opened at all.
                Some(libc::ENXIO) => OpenError::Refused(file_type(libc::S_IFSOCK)),
                _ => OpenError::Io(err),
            });
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let st = fstat(file.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(OpenError::Refused(file_type(st.st_mode)));
        }
        if st.st_nlink > 1 {
            return Err(OpenError::Refused(
                "it is a hard link (the file has other names, maybe outside the lock directory); dlock writes only to files of its own",
            ));
        }
        // Back to blocking mode (the flag only kept a FIFO from blocking the open).
        // SAFETY: fcntl on a descriptor owned here.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        Ok(file)
    }

    /// The entry's (device, inode), without following a link; `None` if there is none.
    fn entry_id(&self, name: &str) -> io::Result<Option<(u64, u64)>> {
        let c = c_name(name)?;
        // SAFETY: fstatat relative to the directory descriptor fills a zeroed stat.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            ) != 0
            {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::NotFound {
                    return Ok(None);
                }
                return Err(err);
            }
            Ok(Some((st.st_dev, st.st_ino)))
        }
    }

    /// True if `file` is still the file named `name` (not replaced or removed).
    pub(crate) fn is_current(&self, file: &File, name: &str) -> io::Result<bool> {
        let open = fstat(file.as_raw_fd())?;
        Ok(self.entry_id(name)? == Some((open.st_dev, open.st_ino)))
    }

    /// Creates a new file under a random hidden name (never a lock or fence file name,
    /// which never start with `.`), exclusively: a name planted in advance, link or not,
    /// makes it fail instead of being used.
    pub(crate) fn create_temp(&self) -> io::Result<(String, File)> {
        let name = format!(".{:032x}.tmp", rand::random::<u128>());
        let c = c_name(&name)?;
        // SAFETY: openat relative to the directory descriptor; the descriptor is owned at
        // once.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                libc::c_uint::from(FILE_MODE),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok((name, File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Renames `from` to `to` inside the directory, replacing `to` (the entry itself,
    /// never what a link there points to).
    pub(crate) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (c_name(from)?, c_name(to)?);
        let dir = self.fd.as_raw_fd();
        // SAFETY: renameat with the directory descriptor and NUL-terminated names.
        if unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes the entry `name` (not following a link).
    pub(crate) fn remove(&self, name: &str) -> io::Result<()> {
        let c = c_name(name)?;
        // SAFETY: unlinkat relative to the directory descriptor.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes created and renamed entries durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        // SAFETY: fsync on the directory descriptor.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
