//! One `SO_REUSEPORT` listener per worker thread, as keel binds them
//! (`keel_http`), for the baseline servers: native-hello and bare-host
//! (which includes this file, so the baselines depend on no keel crate).

use std::net::SocketAddr;

pub fn reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}
