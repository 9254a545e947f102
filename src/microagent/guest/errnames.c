/* Symbolic errno names: the host matches on them (ENOENT means "not found", exit 127). */
#include "errnames.h"

#include <errno.h>
#include <stdio.h>

#define NAME(e) case e: return #e

const char *errno_name(int err)
{
    switch (err) {
    NAME(EPERM); NAME(ENOENT); NAME(ESRCH); NAME(EINTR); NAME(EIO); NAME(ENXIO);
    NAME(E2BIG); NAME(ENOEXEC); NAME(EBADF); NAME(ECHILD); NAME(EAGAIN); NAME(ENOMEM);
    NAME(EACCES); NAME(EFAULT); NAME(EBUSY); NAME(EEXIST); NAME(EXDEV); NAME(ENODEV);
    NAME(ENOTDIR); NAME(EISDIR); NAME(EINVAL); NAME(ENFILE); NAME(EMFILE); NAME(ENOTTY);
    NAME(ETXTBSY); NAME(EFBIG); NAME(ENOSPC); NAME(ESPIPE); NAME(EROFS); NAME(EMLINK);
    NAME(EPIPE); NAME(ERANGE); NAME(ENAMETOOLONG); NAME(ENOSYS); NAME(ENOTEMPTY);
    NAME(ELOOP); NAME(EDQUOT); NAME(ELIBBAD); NAME(ENOTSUP); NAME(EOVERFLOW);
    default: {
        static char buf[16];
        snprintf(buf, sizeof(buf), "E%d", err);
        return buf;
    }
    }
}
