/* The kernel command line's microagent.* parameters. */
#ifndef MICROAGENT_CMDLINE_H
#define MICROAGENT_CMDLINE_H

/* Read /proc/cmdline (proc must be mounted). Returns 0, or -1 after reporting. */
int cmdline_load(void);

/* The value of "key=value" on the command line, or NULL when absent.
 * Double quotes around a value are removed. Valid for the life of the process. */
const char *cmdline_get(const char *key);

/* The value of the n-th (from 0) "key=value" with this key, in command-line order, or NULL
 * when there are fewer: for parameters that repeat (microagent.disk). */
const char *cmdline_get_nth(const char *key, int n);

#endif
