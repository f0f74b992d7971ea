/* test_errors.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_errors(void)
{
    Suite *s = suite_create("errors");
    return s;
}
