//! The local host name, for holder metadata.

/// The host name of this machine, or `"unknown"` if the system cannot tell; read once.
pub fn host_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(read_host_name).clone()
}

/// `host` as a shared string: this machine's name (what nearly every holder record
/// carries) is one allocation for the whole process, shared by every lease that names it.
pub fn shared_host(host: &str) -> std::sync::Arc<str> {
    static SHARED: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
    let shared = SHARED.get_or_init(|| host_name().into());
    if &**shared == host {
        std::sync::Arc::clone(shared)
    } else {
        host.into()
    }
}

fn read_host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
    // when the name fits, and we also stop at the buffer's end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
