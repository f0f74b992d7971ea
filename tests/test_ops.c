/* test_ops.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_ops(void)
{
    Suite *s = suite_create("ops");
    return s;
}
