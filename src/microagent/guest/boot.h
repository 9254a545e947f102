/* Stage 1: from the initramfs to the image's root file system. */
#ifndef MICROAGENT_BOOT_H
#define MICROAGENT_BOOT_H

/* Whether / is the initramfs (ramfs or tmpfs), i.e. stage 1 has to run. */
int in_initramfs(void);

/* Mount /dev, /proc and /sys, load the modules, wait for the root device, mount it and
 * switch root into it in this process (no exec). Returns only on success; on failure it
 * reports the error and powers off. */
void boot_stage1(void);

#endif
