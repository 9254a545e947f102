/* The shutdown path: terminate, sync, unmount, power off. */
#ifndef MICROAGENT_POWER_H
#define MICROAGENT_POWER_H

/* Orderly power-off: SIGTERM to every process, a short grace, SIGKILL, sync, unmount all
 * in reverse order, remount / read-only, reboot(RB_POWER_OFF). Never returns: PID 1
 * exiting would panic the kernel. */
void power_off(const char *reason) __attribute__((noreturn));

/* power_off with grace_ms between SIGTERM and SIGKILL (the host's shutdown operation). */
void power_off_after(const char *reason, int grace_ms) __attribute__((noreturn));

/* Report a fatal error (with strerror(err) unless err is 0) and power off. */
void fatal(int err, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

#endif
