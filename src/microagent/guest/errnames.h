/* Symbolic errno names ("ENOENT") for the "code" of ERROR frames. */
#ifndef MICROAGENT_ERRNAMES_H
#define MICROAGENT_ERRNAMES_H

/* The name of err, or "EIO"-style "E<number>" text in a static buffer when unknown. */
const char *errno_name(int err);

#endif
