/* Loading the kernel modules the initramfs carries. */
#ifndef MICROAGENT_MODULES_H
#define MICROAGENT_MODULES_H

/* The load-order list the host writes into the initramfs. */
#define MODULE_LIST "/etc/microagent/modules"

/* Load every module named in list_path, in order, with finit_module(2). Each line is an
 * absolute path, optionally followed by module parameters; blank lines and lines starting
 * with '#' are skipped. A module already loaded (EEXIST) counts as loaded; other failures
 * are reported and the rest still load. Returns the number loaded. */
int load_modules(const char *list_path);

#endif
