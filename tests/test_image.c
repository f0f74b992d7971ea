/* test_image.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_image(void)
{
    Suite *s = suite_create("image");
    return s;
}
