/* test_data.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_data(void)
{
    Suite *s = suite_create("data");
    return s;
}
