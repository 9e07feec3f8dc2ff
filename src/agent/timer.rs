//! The dead-man deadline as a CLOCK_BOOTTIME timerfd (DESIGN §2): it counts time spent in
//! suspend, needs no polling, and fires whatever clients do on the socket.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Completes when CLOCK_BOOTTIME reaches `deadline_ns` (absolute). Cancel by dropping it.
pub async fn sleep_until_boottime(deadline_ns: u64) -> std::io::Result<()> {
    let tfd = TimerFd::new(ClockId::CLOCK_BOOTTIME, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
    tfd.set(
        Expiration::OneShot(TimeSpec::from_duration(Duration::from_nanos(deadline_ns.max(1)))),
        TimerSetTimeFlags::TFD_TIMER_ABSTIME,
    )?;
    // SAFETY: the descriptor is owned by the TimerFd moved into the AsyncFd: it stays open and
    // refers to the same timer for as long as the registration exists.
    let afd = unsafe { AsyncFd::register_with_interest(Fd(tfd), Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = afd.readable().await?;
        let mut buf = [0u8; 8];
        match nix::unistd::read(guard.get_inner().0.as_fd(), &mut buf) {
            Ok(8) => return Ok(()),
            Ok(_) => guard.clear_ready(),
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(e) => return Err(e.into()),
        }
    }
}
