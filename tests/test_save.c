/* test_save.c — saving as one step: a model folder is replaced whole, what
 * crashed writers left behind is removed the next time the same output is
 * written (and nothing that is not libklvae's), the folders a save refuses.
 * tests/fault_test.sh kills real saves at every system call. */
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/io.h"
#include "test_util.h"

/* config "tiny" with layers_per_block 1 or 2: two models told apart by
 * their parameter count */
static klvae_model_t *model_with_layers(int layers)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_ok(klvae_options_set(o, "layers_per_block", layers == 2 ? "2" : "1"));
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_create(o, &m));
    klvae_options_free(o);
    return m;
}

/* the parameter count of the model saved at path (it must load) */
static int64_t saved_parameters(const char *path)
{
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_load(path, NULL, &m));
    int64_t n = klvae_model_parameter_count(m);
    klvae_model_free(m);
    return n;
}

static void save_layers(int layers, const char *path)
{
    klvae_model_t *m = model_with_layers(layers);
    ck_assert_ok(klvae_model_save(m, path));
    klvae_model_free(m);
}

static void make_folder(const char *path)
{
    ck_assert_msg(mkdir(path, 0755) == 0, "cannot create %s", path);
}

static void put_file(const char *dir, const char *name, const char *text)
{
    char *p = test_join(dir, name);
    test_write_file(p, text, strlen(text));
    free(p);
}

static bool has(const char *dir, const char *name)
{
    char *p = test_join(dir, name);
    bool yes = test_path_exists(p);
    free(p);
    return yes;
}

START_TEST(save_replaces_an_earlier_model_whole)
{
    char *dir = test_tmpdir(), *target = test_join(dir, "model");
    save_layers(1, target);
    const int64_t one = saved_parameters(target);
    ck_assert_int_eq(chmod(target, 0750), 0);
    save_layers(2, target);
    ck_assert_int_gt(saved_parameters(target), one);
    save_layers(1, target);
    ck_assert_int_eq(saved_parameters(target), one);
    /* nothing beside it, nothing else in it, its permissions kept */
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    ck_assert_int_eq(test_count_entries(target, &tmp_found), 2);
    struct stat st;
    ck_assert_int_eq(stat(target, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0750);
    test_rmtree(dir);
    free(target);
    free(dir);
}
END_TEST

START_TEST(save_removes_what_crashed_saves_left)
{
    char *dir = test_tmpdir(), *target = test_join(dir, "model");
    save_layers(1, target);
    /* a crashed save's temporary folder, with a temporary file in it */
    char *stale = test_join(dir, "model.tmp.klvae-Ab12Cd");
    make_folder(stale);
    put_file(stale, "config.json", "{}");
    put_file(stale, "diffusion_pytorch_model.safetensors.tmp.klvae-Zz99Yy", "partial");
    /* one into which someone put a file of their own: that file stays */
    char *kept = test_join(dir, "model.tmp.klvae-Xy34Zw");
    make_folder(kept);
    put_file(kept, "config.json", "{}");
    put_file(kept, "notes.txt", "mine");
    /* one a live writer holds (locked), and names that are not libklvae's */
    char *live = test_join(dir, "model.tmp.klvae-Lk56Mn");
    make_folder(live);
    int lock = open(live, O_RDONLY | O_DIRECTORY);
    ck_assert_int_ge(lock, 0);
    ck_assert_int_eq(flock(lock, LOCK_EX | LOCK_NB), 0);
    char *other = test_join(dir, "model.tmp.Ab12Cd"), *longer = test_join(dir, "model.tmp.klvae-Ab12Cde");
    make_folder(other);
    make_folder(longer);
    save_layers(2, target);
    ck_assert(!test_path_exists(stale));
    ck_assert(has(kept, "notes.txt"));
    ck_assert(!has(kept, "config.json"));
    ck_assert(test_path_exists(live));
    ck_assert(test_path_exists(other));
    ck_assert(test_path_exists(longer));
    close(lock);
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 5);
    test_rmtree(dir);
    free(stale), free(kept), free(live), free(other), free(longer);
    free(target);
    free(dir);
}
END_TEST

START_TEST(save_puts_back_a_folder_a_crash_left_aside)
{
    /* Where folders cannot be swapped, a crash between the two renames
     * leaves the old model at model.old.klvae-XXXXXX and none at model: the
     * next save for model puts it back first (here: one that then fails). */
    char *dir = test_tmpdir(), *target = test_join(dir, "model");
    char *aside = test_join(dir, "model.old.klvae-Qw12Er");
    save_layers(1, aside);
    const int64_t one = saved_parameters(aside);
    kv_atomic_folder f;
    const char *const names[] = {"config.json", "diffusion_pytorch_model.safetensors", NULL};
    ck_assert_ok(kv_folder_begin(&f, target, names));
    kv_folder_abort(&f);
    ck_assert_int_eq(saved_parameters(target), one);
    ck_assert(!test_path_exists(aside));
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    test_rmtree(dir);
    free(aside);
    free(target);
    free(dir);
}
END_TEST

START_TEST(save_refuses_a_folder_holding_other_files)
{
    /* A save replaces the folder: one holding more than a saved model is
     * refused, whole and untouched, with both names in the message. */
    char *dir = test_tmpdir(), *target = test_join(dir, "model");
    save_layers(1, target);
    const int64_t one = saved_parameters(target);
    put_file(target, "README.md", "my notes");
    klvae_model_t *m = model_with_layers(2);
    ck_assert_status(klvae_model_save(m, target), KLVAE_ERR_IO);
    ck_assert_error_mentions(target);
    ck_assert_error_mentions("README.md");
    ck_assert_int_eq(saved_parameters(target), one);
    ck_assert(has(target, "README.md"));
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    /* and a folder in it, even under a saved file's name */
    char *sub = test_join(dir, "other");
    make_folder(sub);
    char *inner = test_join(sub, "config.json");
    make_folder(inner);
    ck_assert_status(klvae_model_save(m, sub), KLVAE_ERR_IO);
    ck_assert_error_mentions("config.json");
    ck_assert(test_path_exists(inner));
    /* an empty folder is fine */
    ck_assert_int_eq(rmdir(inner), 0);
    ck_assert_ok(klvae_model_save(m, sub));
    ck_assert_int_gt(saved_parameters(sub), one);
    klvae_model_free(m);
    test_rmtree(dir);
    free(inner), free(sub);
    free(target);
    free(dir);
}
END_TEST

START_TEST(save_needs_a_folder_name)
{
    klvae_model_t *m = model_with_layers(1);
    const char *bad[] = {"", ".", "..", "/", "some/where/..", "./"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_status(klvae_model_save(m, bad[i]), KLVAE_ERR_INVALID_ARGUMENT);
        ck_assert_error_mentions("name the folder itself");
    }
    klvae_model_free(m);
}
END_TEST

START_TEST(save_through_a_link_replaces_the_folder_it_names)
{
    char *dir = test_tmpdir(), *real = test_join(dir, "real"), *link = test_join(dir, "link");
    save_layers(1, real);
    const int64_t one = saved_parameters(real);
    ck_assert_int_eq(symlink("real", link), 0);
    char slashed[4200];
    snprintf(slashed, sizeof slashed, "%s//", link);
    save_layers(2, slashed);
    struct stat st;
    ck_assert_int_eq(lstat(link, &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    ck_assert_int_gt(saved_parameters(real), one);
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 2);
    ck_assert_int_eq(tmp_found, 0);
    test_rmtree(dir);
    free(real), free(link), free(dir);
}
END_TEST

START_TEST(file_write_removes_only_its_own_stale_temporaries)
{
    char *dir = test_tmpdir(), *png = test_join(dir, "x.png");
    put_file(dir, "x.png.tmp.klvae-Ab12Cd", "a crash's leftover");
    put_file(dir, "x.png.tmp.klvae-Cd34Ef", "a live writer's");
    char *live = test_join(dir, "x.png.tmp.klvae-Cd34Ef");
    int lock = open(live, O_RDONLY);
    ck_assert_int_ge(lock, 0);
    ck_assert_int_eq(flock(lock, LOCK_EX | LOCK_NB), 0);
    put_file(dir, "x.png.tmp.backup", "a user's");             /* not libklvae's name */
    put_file(dir, "y.png.tmp.klvae-Ab12Cd", "another output's"); /* not this output's */
    char *folder = test_join(dir, "x.png.tmp.klvae-Fo12Ld");      /* not a file */
    make_folder(folder);
    float pixels[3 * 4 * 4] = {0};
    ck_assert_ok(klvae_image_write_png(png, pixels, 4, 4));
    ck_assert(!has(dir, "x.png.tmp.klvae-Ab12Cd"));
    ck_assert(has(dir, "x.png.tmp.klvae-Cd34Ef"));
    ck_assert(has(dir, "x.png.tmp.backup"));
    ck_assert(has(dir, "y.png.tmp.klvae-Ab12Cd"));
    ck_assert(test_path_exists(folder));
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 5);
    close(lock);
    /* the lock gone, the next write takes it for stale */
    ck_assert_ok(klvae_image_write_png(png, pixels, 4, 4));
    ck_assert(!has(dir, "x.png.tmp.klvae-Cd34Ef"));
    test_rmtree(dir);
    free(folder), free(live), free(png), free(dir);
}
END_TEST

Suite *suite_save(void)
{
    Suite *s = suite_create("save");
    TCase *tc = tcase_create("one step");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, save_replaces_an_earlier_model_whole);
    tcase_add_test(tc, save_removes_what_crashed_saves_left);
    tcase_add_test(tc, save_puts_back_a_folder_a_crash_left_aside);
    tcase_add_test(tc, save_refuses_a_folder_holding_other_files);
    tcase_add_test(tc, save_needs_a_folder_name);
    tcase_add_test(tc, save_through_a_link_replaces_the_folder_it_names);
    tcase_add_test(tc, file_write_removes_only_its_own_stale_temporaries);
    suite_add_tcase(s, tc);
    return s;
}
