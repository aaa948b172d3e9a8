//! A pipe ping-pong between two processes pinned to one CPU: every byte
//! sent and answered is two context switches, what the prototype's
//! sched_switch programs are measured on (cpuslot (c), batchbench's
//! switch-out drain).

use anyhow::bail;

use crate::cpuslot::pin;

/// The parent's side of a ping-pong whose child answers every byte.
pub(crate) struct PingPong {
    /// The child process.
    pub(crate) child: libc::pid_t,
    to_child: libc::c_int,
    from_child: libc::c_int,
}

impl PingPong {
    /// Forks the child; it and this thread are pinned to `cpu`. The child
    /// runs `on_byte` after each byte it reads, before it answers.
    pub(crate) fn start(cpu: usize, mut on_byte: impl FnMut()) -> anyhow::Result<Self> {
        let (mut a, mut b) = ([0; 2], [0; 2]);
        // SAFETY: two arrays of two fds, as pipe(2) wants.
        if unsafe { libc::pipe(a.as_mut_ptr()) != 0 || libc::pipe(b.as_mut_ptr()) != 0 } {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the child only reads, writes, runs `on_byte` and exits.
        let child = unsafe { libc::fork() };
        if child < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if child == 0 {
            pin(cpu);
            let mut byte = [0u8; 1];
            // SAFETY: fds of the pipes above, a one-byte buffer.
            unsafe {
                // Only the parent's ends stay open here, so its close ends this loop.
                libc::close(a[1]);
                libc::close(b[0]);
                loop {
                    if libc::read(a[0], byte.as_mut_ptr().cast(), 1) != 1 {
                        libc::_exit(0);
                    }
                    on_byte();
                    libc::write(b[1], byte.as_ptr().cast(), 1);
                }
            }
        }
        pin(cpu);
        // SAFETY: the child's ends, not used here.
        unsafe {
            libc::close(a[0]);
            libc::close(b[1]);
        }
        Ok(Self { child, to_child: a[1], from_child: b[0] })
    }

    /// The fastest of 5 runs of `rounds / 5` round trips, in ns per round
    /// trip; `each` runs before every round trip.
    pub(crate) fn fastest(&mut self, rounds: usize, mut each: impl FnMut()) -> f64 {
        let mut byte = [1u8; 1];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            for _ in 0..rounds / 5 {
                each();
                // SAFETY: the parent's ends of the pipes, a one-byte buffer.
                unsafe {
                    libc::write(self.to_child, byte.as_ptr().cast(), 1);
                    libc::read(self.from_child, byte.as_mut_ptr().cast(), 1);
                }
            }
            best = best.min(t0.elapsed().as_nanos() as f64 / (rounds / 5) as f64);
        }
        best
    }

    /// Closes the pipes (the child's read ends it) and waits for the child.
    pub(crate) fn finish(self) {
        // SAFETY: fds owned by self; the child is ours to wait for.
        unsafe {
            libc::close(self.to_child);
            libc::close(self.from_child);
            libc::waitpid(self.child, std::ptr::null_mut(), 0);
        }
    }
}
