/* The ACPI power button (QEMU's system_powerdown) as an orderly power-off.
 *
 * Under QEMU's microvm with acpi=on, system_powerdown makes the generic event device
 * notify the power button device (PNP0C0C). Only the ACPI button driver handles that
 * notification; Debian builds it as a module (button.ko), which must be in the
 * initramfs's module list. The driver then reports "button/power" on the generic
 * netlink family "acpi_event", which this file listens to (no evdev needed). */
#ifndef MICROAGENT_ACPI_H
#define MICROAGENT_ACPI_H

/* Subscribe to ACPI events. Returns 0, or -1 when the kernel has no acpi_event family
 * (then the power button does nothing; reported on the console). */
int acpi_events_open(void);

/* Register the socket with the poller; a power button press powers off. */
void acpi_events_watch(void);

/* Whether the ACPI button driver is loaded (so that system_powerdown works). */
int acpi_power_button_present(void);

#endif
