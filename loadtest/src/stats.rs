//! Latency percentiles and the server's CPU time from `/proc`.

use std::time::Duration;

/// Percentiles of latencies in µs.
pub(crate) fn percentiles(mut us: Vec<u32>) -> [f64; 3] {
    if us.is_empty() {
        return [0.0; 3];
    }
    us.sort_unstable();
    let at = |p: f64| us[(((us.len() - 1) as f64) * p).round() as usize] as f64 / 1000.0;
    [at(0.5), at(0.99), at(0.999)]
}

/// utime + stime of a process.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// utime + stime summed over the processes still running (`None` without any pid); a
/// short-lived helper that exits mid-run (an autovacuum worker) drops out of the sum.
pub(crate) fn cpu_total(pids: &[u32]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    Some(pids.iter().filter_map(|&p| cpu_time(p)).sum())
}

/// CPU time (user + system) of this process so far.
pub(crate) fn own_cpu_time() -> Option<Duration> {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Some(Duration::from_micros(us(ru.ru_utime) + us(ru.ru_stime)))
}
