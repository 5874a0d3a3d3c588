//! `dlock run --metrics ADDR`: the library's metrics (see `fencelock::metrics`) served
//! for Prometheus while dlock runs.

use std::net::{Ipv4Addr, SocketAddr};

/// Parses `--metrics`: `HOST:PORT` with an IP address (`0.0.0.0:9464`, `[::1]:9464`),
/// `localhost:PORT`, or a bare `PORT`, which listens on 127.0.0.1 only.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
    }
    text.parse::<SocketAddr>().map_err(|_| {
        "expected HOST:PORT with an IP address (127.0.0.1:9464, [::1]:9464, 0.0.0.0:9464), localhost:PORT, or a bare PORT".to_owned()
    })
}

/// Installs the Prometheus recorder and serves it on `addr` (see
/// `fencelock::metrics::serve_prometheus`); the message for a failure is one line.
pub fn serve(addr: SocketAddr) -> Result<(), String> {
    fencelock::metrics::serve_prometheus(addr)
        .map_err(|err| format!("cannot serve metrics on {addr}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::parse_addr;

    #[test]
    fn addresses() {
        let parsed = |text: &str| parse_addr(text).map(|addr| addr.to_string());
        assert_eq!(parsed("9464"), Ok("127.0.0.1:9464".to_owned()));
        assert_eq!(parsed("localhost:9"), Ok("127.0.0.1:9".to_owned()));
        assert_eq!(parsed("[::1]:80"), Ok("[::1]:80".to_owned()));
        assert_eq!(parsed("0.0.0.0:9464"), Ok("0.0.0.0:9464".to_owned()));
        assert!(parsed("db.example:9464").is_err());
        assert!(parsed("70000").is_err());
    }
}
