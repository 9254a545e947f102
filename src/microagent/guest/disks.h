/* Attached disks: named volumes, --disk images and bundles, mounted at boot. */
#ifndef MICROAGENT_DISKS_H
#define MICROAGENT_DISKS_H

/* Mount every disk the command line lists (microagent.disk=SERIAL:NAME:DEST:MODE, DEST
 * percent-encoded), in order, creating the mount points. A disk that cannot be found or
 * mounted is fatal: reported on the console ("fatal: disk NAME ...") and the VM powers
 * off, so the host fails the start with that line. Returns the number mounted. */
int disks_attach(void);

#endif
