/* test_model.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_model(void)
{
    Suite *s = suite_create("model");
    return s;
}
