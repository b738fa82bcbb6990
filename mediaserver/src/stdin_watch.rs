//! A child process's way to notice that its parent is gone: the parent hands it a pipe as
//! standard input and never writes to it, and the kernel closes that pipe however the parent
//! ends, SIGKILL included. `chorus-operator local` starts its media servers and bots this way
//! (`--exit-on-stdin-close`), so none of them outlives it holding its ports.
//!
//! A plain thread, not `tokio::io::stdin`: tokio reads stdin with a blocking read it cannot
//! cancel, which would hold up the runtime's shutdown after an ordinary SIGTERM or Ctrl-C.

use std::io::Read;

/// Run `then` on a thread of its own once standard input reaches its end. An unreadable stdin
/// counts as closed: a watch that cannot see its parent must not silently stop watching.
pub fn on_stdin_closed(then: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stdin-watch".to_owned())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0_u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            then();
        })
        .map(drop)
}
