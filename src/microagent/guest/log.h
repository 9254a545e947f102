/* Console messages: every line starts with "microagent-init: ". */
#ifndef MICROAGENT_LOG_H
#define MICROAGENT_LOG_H

/* Make fds 0, 1 and 2 the console if the kernel could not open it for us. */
void log_attach_console(void);

/* One line on the console. */
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* One line on the console ending in ": strerror(err)". */
void log_error(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
