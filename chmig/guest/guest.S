/*
 * guest.S - the chmig test guest.
 *
 * A tiny freestanding x86-64 program that the chmig VMM loads at
 * guest-physical 0x80000 and enters directly in 64-bit long mode (no
 * firmware, no real-mode code: chmig/guest.py sets up the GDT, the identity
 * page tables and the vCPU registers).  Its job is to make live migration
 * *checkable*: every vCPU owns a disjoint share of RAM, stamps each page with
 * a value derived from the page address and a "generation", rewrites a
 * window of pages every round, and verifies every page every round.  A page
 * that a migration lost, corrupted or sent stale (even as part of a whole,
 * self-consistent older copy) is detected, because the generation a page
 * must hold is a pure function of the completed-round count, and that count
 * is kept in three places (r15, xmm15, memory) that must agree.
 *
 * The numbers below are the contract with chmig/guest.py and docs/guest.md;
 * change them in all three places or nowhere.
 *
 * Build (reproducible; see build.sh):
 *     as --64 -o guest.o guest.S
 *     ld -m elf_x86_64 -T guest.ld --build-id=none -o guest.elf guest.o
 *     objcopy -O binary guest.elf guest.bin
 *
 * Register conventions while a workload runs (kept across the whole run;
 * a migration must carry them, which is part of what is being tested):
 *     rbx    this vCPU's status block (0x60000 + 512 * index)
 *     r14    this vCPU's index
 *     r15    verify: completed rounds R      counter: loop count
 *     xmm15  verify: R again (low qword)     (never touched otherwise)
 *     r12    verify: window W (pages rewritten per round), reloaded per round
 *     r13    verify: N (pages owned), reloaded per round
 * Everything else is scratch; each routine lists what it clobbers.
 * Interrupts stay off the whole time (no IDT, no interrupt sources).
 *
 * Privilege level: the code runs unchanged at CPL 0 or CPL 3 (chmig/guest.py
 * picks: CPL 3 with IOPL 3 for verify and counter, CPL 0 for idle).  Some
 * KVM hosts (PVM, used where there is no hardware virtualization) emulate
 * CPL-0 guest code instruction by instruction and cannot emulate SSE at all,
 * while CPL-3 code runs natively there as on VMX/SVM; the only thing CPL 3
 * cannot do is HLT, which the idle workload needs and the park loop avoids.
 */

        .intel_syntax noprefix
        .code64

/* ---- the contract ------------------------------------------------------ */

        .equ PARAMS,             0x50000        /* params block (4 KiB) */
        .equ P_MAGIC,            0x00           /* u64 "CHMIGPRM" */
        .equ P_WORKLOAD,         0x08           /* u32 0 verify, 1 counter, 2 idle */
        .equ P_NCPUS,            0x0c           /* u32 */
        .equ P_DIRTY_PERCENT,    0x10           /* u32 (the VMM turns it into window) */
        .equ PARAMS_MAGIC,       0x4d525047494d4843  /* "CHMIGPRM" little-endian */

        .equ WL_VERIFY,          0
        .equ WL_COUNTER,         1
        .equ WL_IDLE,            2

        .equ STATUS_BASE,        0x60000        /* vCPU k: STATUS_BASE + 512 * k */
        .equ STATUS_SHIFT,       9
        .equ ST_ROUNDS,          0x00
        .equ ST_ERRORS,          0x08
        .equ ST_LAST_ERROR_GPA,  0x10
        .equ ST_TICKS,           0x18
        .equ ST_NPAGES,          0x20           /* filled by the VMM */
        .equ ST_WINDOW,          0x28           /* filled by the VMM */
        .equ ST_NRANGES,         0x30           /* filled by the VMM */
        .equ ST_LAST_ERROR_KIND, 0x38
        .equ ST_INITIALIZED,     0x40
        .equ ST_EXPECTED,        0x48
        .equ ST_FOUND,           0x50
        .equ ST_ERROR_ADDR,      0x58           /* extension: gpa of the bad word */
        .equ ST_RANGES,          0x80           /* {u64 start, u64 end} x 24 */

        .equ MAX_VCPUS,          16
        .equ MAX_RANGES,         24

        .equ ERR_STAMP,          1              /* a page word differs from its stamp */
        .equ ERR_REGISTERS,      2              /* r15 / xmm15 / memory round count differ */
        .equ ERR_PARAMS,         3              /* extension: params or status unusable */

        .equ PAGE_SIZE,          4096
        .equ PACE_PAGES,         256            /* one PORT_PACE per 1 MiB written */
        .equ COUNTER_BEAT,       1 << 26        /* counter iterations per heartbeat */

        .equ PORT_COM1,          0x3f8
        .equ PORT_ROUND,         0x510
        .equ PORT_ERROR,         0x514
        .equ PORT_PACE,          0x518
        .equ PORT_TICK,          0x51c

        .equ STAMP_MULTIPLIER,   0x9e3779b97f4a7c15   /* 2^64 / golden ratio */

/* ---- entry -------------------------------------------------------------- */

        .section .text.entry, "ax"
        .globl _start
_start:
        /* Entered once per vCPU at first boot (after a migration the saved
         * registers resume wherever the vCPU was).  RDI = vCPU index. */
        cld
        mov     r14, rdi

        /* The index selects the status block: refuse one that would point
         * outside the status area before writing anything there. */
        cmp     r14, MAX_VCPUS
        jae     bad_index
        mov     rbx, r14
        shl     rbx, STATUS_SHIFT
        add     rbx, STATUS_BASE

        /* The params block must be ours (magic) and describe this vCPU. */
        mov     eax, PARAMS
        mov     rcx, PARAMS_MAGIC
        cmp     [rax + P_MAGIC], rcx
        jne     bad_params
        mov     ecx, [rax + P_NCPUS]
        cmp     r14, rcx
        jae     bad_params
        mov     ecx, [rax + P_WORKLOAD]
        cmp     ecx, WL_VERIFY
        je      verify_start
        cmp     ecx, WL_COUNTER
        je      counter_start
        cmp     ecx, WL_IDLE
        je      idle_start
        /* fall through: unknown workload */

bad_params:
        /* Record kind 3 so the VMM sees why nothing happens, then park. */
        xor     esi, esi
        xor     eax, eax
        xor     edx, edx
        xor     r8d, r8d
        mov     ecx, ERR_PARAMS
        call    record_error
bad_index:
        lea     rsi, [rip + msg_bad_params]
        call    puts
park:
        /* Stop for good.  At CPL 0, HLT (with no in-kernel irqchip every
         * HLT exits to the VMM, which just re-enters); at CPL 3 HLT would
         * fault, so spin on PAUSE instead. */
        mov     eax, cs
        test    eax, 3
        jnz     .Lpark_spin
.Lpark_hlt:
        hlt
        jmp     .Lpark_hlt
.Lpark_spin:
        pause
        jmp     .Lpark_spin

/* ---- workload: verify ----------------------------------------------------- */

verify_start:
        /* The round counter comes from memory (zero at first boot). */
        mov     r15, [rbx + ST_ROUNDS]
        movq    xmm15, r15
        cmp     qword ptr [rbx + ST_NRANGES], MAX_RANGES
        ja      bad_params

        /* First boot: give every owned page its generation-0 stamp, which
         * is what round 1's check expects for pages outside its window. */
        cmp     qword ptr [rbx + ST_INITIALIZED], 0
        jne     verify_round
        call    stamp_all_generation0
        mov     qword ptr [rbx + ST_INITIALIZED], 1

verify_round:
        /* N and W are VMM-filled constants; reloading them each round keeps
         * them out of the state a migration must get right. */
        mov     r13, [rbx + ST_NPAGES]
        mov     r12, [rbx + ST_WINDOW]

        /* Step 1: r15 == memory == xmm15.  Any difference means register
         * state and memory came from different moments (or got damaged). */
        mov     rax, [rbx + ST_ROUNDS]
        movq    rcx, xmm15
        cmp     r15, rax
        jne     register_mismatch
        cmp     rcx, rax
        jne     register_mismatch
registers_ok:

        /* Step 2: every owned page must hold its expected generation. */
        call    check_pass

        /* Step 3: stamp round R+1's window with generation R+1. */
        call    rewrite_pass

        /* Step 4: R += 1 in all three places.  Memory first, then the
         * registers; a pause between any two of these is harmless because
         * the next comparison (step 1) runs after all three are written. */
        lea     rax, [r15 + 1]
        mov     [rbx + ST_ROUNDS], rax
        mov     r15, rax
        movq    xmm15, rax

        /* "cpu K round RRRRRRRR errors EEEEEEEE\n" on COM1, then tell the
         * VMM the round (and the status block) is complete. */
        call    print_cpu_prefix
        lea     rsi, [rip + msg_round]
        call    puts
        mov     rax, r15
        mov     ecx, 8 * 4
        call    print_hex
        lea     rsi, [rip + msg_errors]
        call    puts
        mov     rax, [rbx + ST_ERRORS]
        mov     ecx, 8 * 4
        call    print_hex
        mov     al, '\n'
        call    putc
        mov     eax, r14d
        mov     edx, PORT_ROUND
        out     dx, eax
        jmp     verify_round

register_mismatch:
        /* Kind 2: expected = the memory copy (rax); found = r15 if it is the
         * one that differs, else xmm15's low qword (rcx).  Then resync both
         * registers from memory so one mismatch is reported once. */
        mov     rdx, r15
        cmp     r15, rax
        cmove   rdx, rcx
        xor     esi, esi
        xor     r8d, r8d
        mov     ecx, ERR_REGISTERS
        call    record_error
        mov     r15, [rbx + ST_ROUNDS]
        movq    xmm15, r15
        jmp     registers_ok

/*
 * check_pass: compare every owned page against the stamp of the generation
 * expected after R = r15 completed rounds; record (and report) the first bad
 * word of each bad page, then go on with the next page.
 * Clobbers rax, rcx, rdx, rsi, rdi, r8-r11, rbp, xmm0-xmm11.
 */
check_pass:
        test    r13, r13
        jz      .Lcheck_done
        xor     ebp, ebp                        /* rbp = local page index i */
        lea     r10, [rbx + ST_RANGES]          /* r10 = current range */
        mov     r11, [rbx + ST_NRANGES]         /* r11 = ranges left */
.Lcheck_range:
        test    r11, r11
        jz      .Lcheck_done
        mov     rsi, [r10]                      /* rsi = page gpa P */
        mov     r9, [r10 + 8]                   /* r9 = range end (exclusive) */
.Lcheck_page:
        cmp     rsi, r9
        jae     .Lcheck_next_range
        call    expected_generation             /* rax = g(i, R) */
        mov     rcx, STAMP_MULTIPLIER
        imul    rax, rcx
        mov     r8, rax                         /* r8 = key = g * multiplier */
        call    check_page
        test    eax, eax
        jz      .Lcheck_page_ok
        call    report_bad_page                 /* slow path: find the word */
.Lcheck_page_ok:
        add     rsi, PAGE_SIZE
        inc     rbp
        jmp     .Lcheck_page
.Lcheck_next_range:
        add     r10, 16
        dec     r11
        jmp     .Lcheck_range
.Lcheck_done:
        ret

/*
 * expected_generation: the generation local page i = rbp must hold after
 * R = r15 completed rounds with N = r13 pages and window W = r12.
 *   0                                   if W == 0 or R*W <= i
 *   floor(u / W) + 1, u = i + N*floor((R*W - 1 - i) / N)   otherwise
 * (u is the last position below R*W that lands on page i, since round r
 * covers positions [(r-1)*W, r*W) modulo N.)  Needs N > 0.
 * Returns rax; clobbers rdx.
 */
expected_generation:
        test    r12, r12
        jz      .Lgen_zero
        mov     rax, r15
        imul    rax, r12                        /* R*W */
        cmp     rax, rbp
        jbe     .Lgen_zero                      /* page not reached yet */
        sub     rax, 1
        sub     rax, rbp
        xor     edx, edx
        div     r13                             /* floor((R*W-1-i) / N) */
        imul    rax, r13
        add     rax, rbp                        /* u */
        xor     edx, edx
        div     r12
        inc     rax                             /* floor(u / W) + 1 */
        ret
.Lgen_zero:
        xor     eax, eax
        ret

/*
 * check_page: does page rsi hold key r8 (word at a == a XOR key) everywhere?
 * The fast path: 64 bytes per iteration, four 16-byte vectors of data XOR
 * key compared with vectors of their own addresses, one branch per 64 bytes.
 * Returns eax = 0 if the page is good, 1 if not.
 * Clobbers rax, rcx, rdx, xmm0-xmm11.
 */
check_page:
        call    address_vectors                 /* xmm4-7, xmm8, xmm11 */
        mov     rcx, rsi
        lea     rdx, [rsi + PAGE_SIZE]
.Lcp_loop:
        movdqa  xmm0, [rcx]
        movdqa  xmm1, [rcx + 16]
        movdqa  xmm2, [rcx + 32]
        movdqa  xmm3, [rcx + 48]
        pxor    xmm0, xmm8
        pxor    xmm1, xmm8
        pxor    xmm2, xmm8
        pxor    xmm3, xmm8
        pcmpeqd xmm0, xmm4
        pcmpeqd xmm1, xmm5
        pcmpeqd xmm2, xmm6
        pcmpeqd xmm3, xmm7
        pand    xmm0, xmm1
        pand    xmm2, xmm3
        pand    xmm0, xmm2
        pmovmskb eax, xmm0
        cmp     eax, 0xffff
        jne     .Lcp_bad
        paddq   xmm4, xmm11
        paddq   xmm5, xmm11
        paddq   xmm6, xmm11
        paddq   xmm7, xmm11
        add     rcx, 64
        cmp     rcx, rdx
        jb      .Lcp_loop
        xor     eax, eax
        ret
.Lcp_bad:
        mov     eax, 1
        ret

/*
 * address_vectors: set up the SIMD constants for page rsi and key r8:
 *   xmm8 = {key, key}; xmm4..xmm7 = the addresses of the first 8 words as
 *   {P, P+8}, {P+16, P+24}, {P+32, P+40}, {P+48, P+56}; xmm11 = {64, 64}.
 * Clobbers xmm4-xmm8, xmm11.
 */
address_vectors:
        movq    xmm8, r8
        punpcklqdq xmm8, xmm8
        movq    xmm4, rsi
        punpcklqdq xmm4, xmm4
        paddq   xmm4, [rip + lanes_0_8]
        movdqa  xmm11, [rip + lanes_16_16]
        movdqa  xmm5, xmm4
        paddq   xmm5, xmm11
        movdqa  xmm6, xmm5
        paddq   xmm6, xmm11
        movdqa  xmm7, xmm6
        paddq   xmm7, xmm11
        movdqa  xmm11, [rip + lanes_64_64]
        ret

/*
 * report_bad_page: page rsi failed check_page with key r8; find its first
 * bad word with a plain scalar scan and record a kind-1 error for the page.
 * Clobbers rax, rcx, rdx, rdi.
 */
report_bad_page:
        mov     rdi, rsi
        lea     rcx, [rsi + PAGE_SIZE]
.Lrb_scan:
        mov     rax, rdi
        xor     rax, r8                         /* expected */
        mov     rdx, [rdi]                      /* found */
        cmp     rax, rdx
        jne     .Lrb_found
        add     rdi, 8
        cmp     rdi, rcx
        jb      .Lrb_scan
        ret                                     /* changed under us: nothing to report */
.Lrb_found:
        push    r8
        mov     r8, rdi
        mov     ecx, ERR_STAMP
        call    record_error
        pop     r8
        ret

/*
 * record_error: fill the error fields of the status block, count the error
 * and tell the VMM (PORT_ERROR, eax = index).  errors is incremented last,
 * so whoever sees the count change sees complete details.
 *   ecx = kind, rsi = page gpa (0 if none), rax = expected, rdx = found,
 *   r8 = gpa of the bad word (0 if none).
 * Clobbers rax, rdx.
 */
record_error:
        mov     [rbx + ST_LAST_ERROR_GPA], rsi
        mov     [rbx + ST_LAST_ERROR_KIND], rcx
        mov     [rbx + ST_EXPECTED], rax
        mov     [rbx + ST_FOUND], rdx
        mov     [rbx + ST_ERROR_ADDR], r8
        inc     qword ptr [rbx + ST_ERRORS]
        mov     eax, r14d
        mov     edx, PORT_ERROR
        out     dx, eax
        ret

/*
 * rewrite_pass: stamp generation R+1 on the pages of round R+1's window,
 * i.e. local index i with (i - (R*W mod N)) mod N < W, pacing the writes.
 * Clobbers rax, rcx, rdx, rsi, rdi, r8-r11, rbp, xmm0-xmm11.
 */
rewrite_pass:
        test    r13, r13
        jz      .Lrw_done
        test    r12, r12
        jz      .Lrw_done
        mov     rax, r15
        imul    rax, r12
        xor     edx, edx
        div     r13
        mov     rdi, rdx                        /* rdi = window start s */
        lea     rax, [r15 + 1]
        mov     rcx, STAMP_MULTIPLIER
        imul    rax, rcx
        mov     r8, rax                         /* r8 = key of generation R+1 */
        jmp     stamp_window                    /* its ret returns to our caller */
.Lrw_done:
        ret

/*
 * stamp_all_generation0: first boot; every owned page gets the stamp of
 * generation 0 (each word holds its own address): the window starting at
 * 0 that is N pages wide.  Paced like a rewrite.
 * Clobbers rax, rcx, rdx, rsi, rdi, r8-r13, rbp, xmm0-xmm11.
 */
stamp_all_generation0:
        mov     r13, [rbx + ST_NPAGES]
        mov     r12, r13                        /* W = N: every page */
        xor     edi, edi                        /* s = 0 */
        xor     r8d, r8d                        /* key of generation 0 */
        /* fall through */

/*
 * stamp_window: the one walk over this vCPU's pages that writes stamps.
 * Stamps key r8 on every local index i with (i - s) mod N < W, where
 * rdi = s, r12 = W, r13 = N; pace_page/pace_flush pace the writes.
 * Clobbers rax, rcx, rdx, rsi, r8-r11, rbp, xmm0-xmm11.
 */
stamp_window:
        sub     rsp, 16                         /* [rsp] = pages since last pace */
        mov     qword ptr [rsp], 0
        xor     ebp, ebp
        lea     r10, [rbx + ST_RANGES]
        mov     r11, [rbx + ST_NRANGES]
.Lsw_range:
        test    r11, r11
        jz      .Lsw_flush
        mov     rsi, [r10]
        mov     r9, [r10 + 8]
.Lsw_page:
        cmp     rsi, r9
        jae     .Lsw_next_range
        mov     rax, rbp                        /* d = (i - s) mod N */
        sub     rax, rdi
        jae     .Lsw_in_order
        add     rax, r13
.Lsw_in_order:
        cmp     rax, r12
        jae     .Lsw_skip                       /* outside the window */
        call    stamp_page
        call    pace_page
.Lsw_skip:
        add     rsi, PAGE_SIZE
        inc     rbp
        jmp     .Lsw_page
.Lsw_next_range:
        add     r10, 16
        dec     r11
        jmp     .Lsw_range
.Lsw_flush:
        call    pace_flush
        add     rsp, 16
        ret

/*
 * pace_page / pace_flush: the caller keeps a "pages written since the last
 * pace" count in its frame at [rsp] (which is [rsp + 8] here, above our
 * return address).  Every PACE_PAGES pages, and once at the end for the
 * remainder, `out PORT_PACE` with the count lets the VMM throttle us.
 * Clobbers rax, rdx.
 */
pace_page:
        mov     rax, [rsp + 8]
        inc     rax
        cmp     rax, PACE_PAGES
        jb      .Lpace_keep
        mov     edx, PORT_PACE
        out     dx, eax
        xor     eax, eax
.Lpace_keep:
        mov     [rsp + 8], rax
        ret
pace_flush:
        mov     rax, [rsp + 8]
        test    rax, rax
        jz      .Lflush_none
        mov     edx, PORT_PACE
        out     dx, eax
        mov     qword ptr [rsp + 8], 0
.Lflush_none:
        ret

/*
 * stamp_page: write key r8 into page rsi (word at a := a XOR key), 64 bytes
 * per iteration with the same address vectors as check_page.
 * Clobbers rcx, rdx, xmm0-xmm11.
 */
stamp_page:
        call    address_vectors
        mov     rcx, rsi
        lea     rdx, [rsi + PAGE_SIZE]
.Lsp_loop:
        movdqa  xmm0, xmm4
        movdqa  xmm1, xmm5
        movdqa  xmm2, xmm6
        movdqa  xmm3, xmm7
        pxor    xmm0, xmm8
        pxor    xmm1, xmm8
        pxor    xmm2, xmm8
        pxor    xmm3, xmm8
        movdqa  [rcx], xmm0
        movdqa  [rcx + 16], xmm1
        movdqa  [rcx + 32], xmm2
        movdqa  [rcx + 48], xmm3
        paddq   xmm4, xmm11
        paddq   xmm5, xmm11
        paddq   xmm6, xmm11
        paddq   xmm7, xmm11
        add     rcx, 64
        cmp     rcx, rdx
        jb      .Lsp_loop
        ret

/* ---- workload: counter ---------------------------------------------------- */

counter_start:
        /* A busy loop whose state lives in a register (r15) and in memory
         * (status.ticks), both incremented every iteration; every
         * COUNTER_BEAT iterations a heartbeat goes to COM1 and PORT_TICK. */
        mov     r15, [rbx + ST_TICKS]
counter_beat:
        mov     ecx, COUNTER_BEAT
.Lcounter_loop:
        inc     qword ptr [rbx + ST_TICKS]
        inc     r15
        dec     ecx
        jnz     .Lcounter_loop
        call    print_cpu_prefix
        lea     rsi, [rip + msg_tick]
        call    puts
        mov     rax, r15
        mov     ecx, 16 * 4
        call    print_hex
        mov     al, '\n'
        call    putc
        mov     eax, r14d
        mov     edx, PORT_TICK
        out     dx, eax
        jmp     counter_beat

/* ---- workload: idle ------------------------------------------------------- */

idle_start:
        /* HLT is privileged: at CPL 3 it would fault, so refuse clearly. */
        mov     eax, cs
        test    eax, 3
        jnz     bad_params
idle_loop:
        /* Each HLT exits to the VMM (no in-kernel irqchip), which waits and
         * re-enters; then one tick is counted and reported. */
        hlt
        inc     qword ptr [rbx + ST_TICKS]
        mov     eax, r14d
        mov     edx, PORT_TICK
        out     dx, eax
        jmp     idle_loop

/* ---- COM1 output ---------------------------------------------------------- */

/* putc: al to COM1.  Clobbers rdx. */
putc:
        mov     edx, PORT_COM1
        out     dx, al
        ret

/* puts: the NUL-terminated string at rsi to COM1.  Clobbers rax, rdx, rsi. */
puts:
        mov     al, [rsi]
        test    al, al
        jz      .Lputs_done
        call    putc
        inc     rsi
        jmp     puts
.Lputs_done:
        ret

/* print_hex: the low ecx bits of rax (ecx a multiple of 4) as ecx/4 hex
 * digits, most significant first.  Clobbers rax, rcx, rdx, rdi. */
print_hex:
        mov     rdi, rax
.Lhex_next:
        sub     ecx, 4
        jb      .Lhex_done
        mov     rax, rdi
        shr     rax, cl
        and     eax, 15
        lea     rdx, [rip + hex_digits]
        mov     al, [rdx + rax]
        call    putc
        jmp     .Lhex_next
.Lhex_done:
        ret

/* print_cpu_prefix: "cpu K " with K in hex.  Clobbers rax, rcx, rdx, rdi, rsi. */
print_cpu_prefix:
        lea     rsi, [rip + msg_cpu]
        call    puts
        mov     rax, r14
        mov     ecx, 1 * 4
        cmp     r14, 16
        jb      .Lprefix_one_digit
        mov     ecx, 2 * 4
.Lprefix_one_digit:
        call    print_hex
        mov     al, ' '
        jmp     putc

/* ---- constants -------------------------------------------------------------- */

        .section .rodata, "a"
        .balign 16
lanes_0_8:      .quad 0, 8
lanes_16_16:    .quad 16, 16
lanes_64_64:    .quad 64, 64
hex_digits:     .ascii "0123456789abcdef"
msg_cpu:        .asciz "cpu "
msg_round:      .asciz "round "
msg_errors:     .asciz " errors "
msg_tick:       .asciz "tick "
msg_bad_params: .asciz "chmig guest: bad params or vcpu index, parked\n"
