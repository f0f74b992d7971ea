/* test_sample.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_sample(void)
{
    Suite *s = suite_create("sample");
    return s;
}
