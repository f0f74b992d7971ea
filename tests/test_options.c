/* test_options.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_options(void)
{
    Suite *s = suite_create("options");
    return s;
}
