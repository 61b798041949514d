#!/usr/bin/env python3
"""Generates the filetests (*.fold with asm: lines); then run `python3 assemble.py *.fold`.
Expected values here are computed by hand (setcc/cmovcc/jcc from the condition table below);
the runner cross-checks them against the CPU. A file's `expect-exact:` block is written by the
runner (DYNSPEC_BLESS=1), not here: regenerating keeps the existing one."""
import os
D=os.path.dirname(os.path.abspath(__file__))
def exact_block(path):
    """The `expect-exact:` block of an existing file (marker and its indented lines), or []."""
    try:
        lines=open(path).read().splitlines()
    except FileNotFoundError:
        return []
    for i,l in enumerate(lines):
        if l.split(';')[0].strip()=='expect-exact:':
            j=i+1
            while j<len(lines) and lines[j].startswith((' ','\t')) and lines[j].strip(): j+=1
            return lines[i:j]
    return []
def case(name, title, asm, set_='', flag='', mem=(), expects=(), extra=()):
    L=[f'; test: {title}']
    for a in asm: L.append(f'asm: {a}')
    if set_: L.append(f'set: {set_}')
    if flag: L.append(f'flag: {flag}')
    for m in mem: L.append(f'mem: {m}')
    for e in extra: L.append(e)
    for e in expects:
        L.append(e if e.startswith('expect') else f'expect {e}')
    path=os.path.join(D, name+'.fold')
    L+=exact_block(path)
    open(path,'w').write('\n'.join(L)+'\n')

def ex(**kw):
    return [f'{k}: {v}' for k,v in kw.items()]

# ---- add / sub / adc / sbb
case('add_carry32','32-bit add wraps to zero: CF, ZF, AF, PF set',
 ['mov eax, 0xffffffff','add eax, 1'], expects=ex(rax='0x0',cf=1,zf=1,sf=0,of=0,pf=1,af=1))
case('add_overflow64','64-bit signed overflow sets OF and SF',
 ['add rax, 1'], set_='rax=0x7fffffffffffffff', expects=ex(rax='0x8000000000000000',of=1,sf=1,cf=0,zf=0,pf=1,af=1))
case('add_8bit_merge','8-bit add merges into the low byte only',
 ['add al, 0x90'], set_='rax=0x12345678', expects=ex(rax='0x12345608',cf=1,of=0,sf=0,zf=0,af=0,pf=0))
case('add_16bit_merge','16-bit add merges, signed overflow of two negatives',
 ['add ax, 0x8000'], set_='rax=0xffffffffffff8000', expects=ex(rax='0xffffffffffff0000',cf=1,of=1,zf=1,sf=0,pf=1,af=0))
case('add_high8','add to bh touches bits 8..15 only',
 ['add bh, 0xf0'], set_='rbx=0xaaaa1234', expects=ex(rbx='0xaaaa0234',cf=1,of=0,sf=0,zf=0,af=0,pf=0))
case('add_32bit_zero_extends','32-bit add clears the upper half',
 ['add eax, 1'], set_='rax=0xffffffff00000001', expects=ex(rax='0x2',cf=0,zf=0))
case('add_reg_known_becomes_imm','a known source register becomes an immediate in the residual add',
 ['add rax, rcx'], set_='rcx=7', expects=ex(rax='unknown',cf='unknown')+['expect residual has: add rax, 0x7'])
case('add_unknown_stays','add with an unknown operand stays residual and kills what it writes',
 ['add rax, rbx'], set_='rax=1', flag='cf=1', expects=ex(rax='unknown',cf='unknown',zf='unknown',of='unknown'))
case('sub_borrow32','32-bit sub borrows: CF, SF, AF; result zero-extended',
 ['sub ecx, 5'], set_='rcx=0xffffffff00000003', expects=ex(rcx='0xfffffffe',cf=1,sf=1,of=0,zf=0,af=1,pf=0))
case('sub_overflow8','8-bit 0x80-1 overflows',
 ['sub dl, 1'], set_='rdx=0x80', expects=ex(rdx='0x7f',of=1,cf=0,sf=0,zf=0,af=1,pf=0))
case('sub_16bit_zero','16-bit sub to zero merges and sets ZF',
 ['sub si, di'], set_='rsi=0x1111222233334444 rdi=0x4444', expects=ex(rsi='0x1111222233330000',zf=1,cf=0,of=0,sf=0,pf=1,af=0))
case('sub_64_ch','sub from ch with a high-byte source',
 ['sub ch, ah'], set_='rcx=0x0100 rax=0x0200', expects=ex(rcx='0xff00',rax='0x200',cf=1,sf=1,zf=0,of=0,af=1,pf=1))
case('adc_with_carry','adc adds the incoming carry',
 ['adc rax, rcx'], set_='rax=1 rcx=2', flag='cf=1', expects=ex(rax='0x4',cf=0,of=0,sf=0,zf=0,af=0,pf=0))
case('adc_carry_chain','adc 0 with carry wraps all ones',
 ['adc rax, 0'], set_='rax=0xffffffffffffffff', flag='cf=1', expects=ex(rax='0x0',cf=1,zf=1,af=1,pf=1,of=0,sf=0))
case('adc_8bit_overflow','8-bit adc: 0x7f + 0 + CF overflows',
 ['adc bl, 0'], set_='rbx=0x7f', flag='cf=1', expects=ex(rbx='0x80',of=1,cf=0,sf=1,af=1,zf=0,pf=0))
case('adc_unknown_carry','adc with an unknown carry cannot fold',
 ['adc rax, 1'], set_='rax=5', expects=ex(rax='unknown'))
case('sbb_borrow32','sbb 0 with borrow gives 0xffffffff',
 ['sbb eax, 0'], set_='rax=0x1234567800000000', flag='cf=1', expects=ex(rax='0xffffffff',cf=1,sf=1,zf=0,of=0,af=1,pf=1))
case('sbb_16bit','16-bit sbb without borrow to zero',
 ['sbb bx, cx'], set_='rbx=0x1111222233334444 rcx=0x4444', flag='cf=0', expects=ex(rbx='0x1111222233330000',zf=1,cf=0,of=0,sf=0,pf=1,af=0))
case('sbb_8bit_overflow','8-bit sbb 0x80 - 0 - CF overflows',
 ['sbb cl, 0'], set_='rcx=0x80', flag='cf=1', expects=ex(rcx='0x7f',of=1,cf=0,sf=0,af=1,zf=0,pf=0))
# ---- logic
case('and_32','and clears CF/OF, AF undefined',
 ['and eax, ecx'], set_='rax=0xfffff0f0 rcx=0x0ff0', expects=ex(rax='0xf0',cf=0,of=0,zf=0,sf=0,pf=1,af='unknown'))
case('and_8_zero','8-bit and to zero keeps upper bytes',
 ['and dh, 0x0f'], set_='rdx=0x12f000', flag='af=1', expects=ex(rdx='0x120000',zf=1,pf=1,sf=0,cf=0,of=0,af='unknown'))
case('or_8','or sets SF from bit 7',
 ['or cl, 1'], set_='rcx=0x80', expects=ex(rcx='0x81',sf=1,pf=1,zf=0,cf=0,of=0))
case('or_64_imm','64-bit or with sign-extended imm8',
 ['or rax, -16'], set_='rax=0x5', expects=ex(rax='0xfffffffffffffff5',sf=1,zf=0,cf=0,of=0,pf=1))
case('xor_self','xor eax, eax is zero even when eax is unknown',
 ['xor eax, eax'], expects=ex(rax='0x0',zf=1,pf=1,cf=0,of=0,sf=0,af='unknown'))
case('xor_16','16-bit xor merges',
 ['xor bx, 0x00ff'], set_='rbx=0xabcd00ff00ff', expects=ex(rbx='0xabcd00ff0000',zf=1,pf=1,sf=0,cf=0,of=0))
case('not_16','not leaves flags untouched',
 ['not dx'], set_='rdx=0x9999ff00', flag='cf=1 zf=1', expects=ex(rdx='0x999900ff',cf=1,zf=1))
case('not_32','32-bit not zero-extends',
 ['not eax'], set_='rax=0xffffffff00000000', expects=ex(rax='0xffffffff'))
case('not_8_high','not on ah',
 ['not ah'], set_='rax=0x1234', expects=ex(rax='0xed34'))
case('neg_64','neg of a positive: CF=1, AF from low nibble',
 ['neg rax'], set_='rax=5', expects=ex(rax='0xfffffffffffffffb',cf=1,sf=1,of=0,zf=0,af=1,pf=0))
case('neg_zero','neg of zero clears CF',
 ['neg ecx'], set_='rcx=0xffffffff00000000', expects=ex(rcx='0x0',cf=0,zf=1,of=0,sf=0,af=0,pf=1))
case('neg_min8','neg of 0x80 overflows',
 ['neg al'], set_='rax=0x80', expects=ex(rax='0x80',of=1,cf=1,sf=1,zf=0,af=0,pf=0))
case('neg_16','neg on 16 bits merges',
 ['neg bx'], set_='rbx=0xaaaa0001', expects=ex(rbx='0xaaaaffff',cf=1,sf=1,of=0,zf=0,af=1,pf=1))
case('inc_overflow32','inc keeps CF, overflows to 0x80000000',
 ['inc eax'], set_='rax=0x7fffffff', flag='cf=1', expects=ex(rax='0x80000000',of=1,sf=1,cf=1,af=1,pf=1,zf=0))
case('inc_8_wrap','8-bit inc wraps to zero, CF unchanged',
 ['inc bl'], set_='rbx=0x12ff', flag='cf=0', expects=ex(rbx='0x1200',zf=1,cf=0,of=0,af=1,pf=1,sf=0))
case('dec_8_zero','dec to zero, CF unchanged',
 ['dec cl'], set_='rcx=0x101', flag='cf=1', expects=ex(rcx='0x100',zf=1,cf=1,af=0,pf=1,of=0,sf=0))
case('dec_16_wrap','16-bit dec wraps to 0xffff',
 ['dec bx'], set_='rbx=0x10000', expects=ex(rbx='0x1ffff',sf=1,af=1,of=0,pf=1,zf=0))
case('dec_64_overflow','dec of INT64_MIN overflows',
 ['dec rdi'], set_='rdi=0x8000000000000000', expects=ex(rdi='0x7fffffffffffffff',of=1,sf=0,zf=0,af=1,pf=1))
# ---- shifts
case('shl_1','shl by 1: CF is the bit out, OF = MSB xor CF',
 ['shl eax, 1'], set_='rax=0x80000001', expects=ex(rax='0x2',cf=1,of=1,sf=0,zf=0,pf=0,af='unknown'))
case('shl_cl_masked64','shl rax, cl masks the count to 6 bits (65 -> 1)',
 ['shl rax, cl'], set_='rax=1 rcx=65', expects=ex(rax='0x2',cf=0,of=0,zf=0,sf=0,pf=0))
case('shl_count0','shl by cl=64 (masked to 0) leaves value and flags',
 ['shl rax, cl'], set_='rax=5 rcx=64', flag='cf=1 zf=1 sf=1 of=1 pf=0 af=1', expects=ex(rax='0x5',cf=1,zf=1,sf=1,of=1,pf=0,af=1))
case('shl_imm_multi','shl by 4: OF undefined',
 ['shl rdx, 4'], set_='rdx=0x1f00000000000001', expects=ex(rdx='0xf000000000000010',cf=1,of='unknown',sf=1,zf=0,pf=0))
case('shl_8bit_count_gt_width','8-bit shl by 9: count is masked to 5 bits only, result 0',
 ['shl al, cl'], set_='rax=0x1ff rcx=9', expects=ex(rax='0x100',zf=1,sf=0,pf=1))
case('shr_1','shr by 1: OF is the original MSB',
 ['shr dl, 1'], set_='rdx=0x81', expects=ex(rdx='0x40',cf=1,of=1,sf=0,zf=0,pf=0))
case('shr_32_cl','32-bit shr by cl=33 (masked to 1) zero-extends',
 ['shr eax, cl'], set_='rax=0xffffffff00000003 rcx=33', expects=ex(rax='0x1',cf=1,of=0,zf=0,sf=0))
case('shr_16','16-bit shr by 8 merges',
 ['shr bx, 8'], set_='rbx=0xaaaa8000', expects=ex(rbx='0xaaaa0080',cf=0,zf=0,sf=0,pf=0,of='unknown'))
case('sar_multi','sar by 4 replicates the sign; OF undefined',
 ['sar eax, 4'], set_='rax=0x80000008', expects=ex(rax='0xf8000000',cf=1,sf=1,zf=0,pf=1,of='unknown'))
case('sar_1','sar by 1 of -1: CF=1, OF=0',
 ['sar rcx, 1'], set_='rcx=-1', expects=ex(rcx='0xffffffffffffffff',cf=1,of=0,sf=1,zf=0,pf=1))
case('sar_cl_0','sar by cl=32 on 32 bits (masked to 0) keeps flags',
 ['sar ebx, cl'], set_='rbx=0x80 rcx=32', flag='cf=1 zf=0 of=1', expects=ex(cf=1,zf=0,of=1))
case('sar_8_high','sar on ch',
 ['sar ch, 2'], set_='rcx=0x8100', expects=ex(rcx='0xe000',cf=0,sf=1,zf=0,pf=0))
case('rol_1','rol by 1: CF = new LSB, OF = MSB xor CF; other flags kept',
 ['rol eax, 1'], set_='rax=0x80000001', flag='zf=1 sf=0', expects=ex(rax='0x3',cf=1,of=1,zf=1,sf=0))
case('rol_16_multi','16-bit rol by 4: OF undefined',
 ['rol ax, 4'], set_='rax=0xffff1234', expects=ex(rax='0xffff2341',cf=1,of='unknown'))
case('rol_64_cl','64-bit rol by cl masked (68 -> 4)',
 ['rol rdx, cl'], set_='rdx=0xf000000000000001 rcx=68', expects=ex(rdx='0x1f',cf=1))
case('ror_1','ror by 1 on bl: CF = new MSB, OF = xor of top two bits',
 ['ror bl, 1'], set_='rbx=0x01', expects=ex(rbx='0x80',cf=1,of=1))
case('ror_cl','ror by cl=4 on 32 bits',
 ['ror edx, cl'], set_='rdx=0x12345678 rcx=4', expects=ex(rdx='0x81234567',cf=1,of='unknown'))
case('ror_count0','ror by 0 (cl=0) keeps flags',
 ['ror rsi, cl'], set_='rsi=0x1234 rcx=0', flag='cf=0 of=1', expects=ex(rsi='0x1234',cf=0,of=1))
# ---- imul
case('imul_1op_64','one-operand imul: rdx:rax = rax*rcx signed',
 ['imul rcx'], set_='rax=-2 rcx=3', expects=ex(rax='0xfffffffffffffffa',rdx='0xffffffffffffffff',cf=0,of=0,zf='unknown',sf='unknown',pf='unknown',af='unknown'))
case('imul_1op_8','one-operand 8-bit imul writes ax',
 ['imul cl'], set_='rax=0xffff0050 rcx=4', expects=ex(rax='0xffff0140',cf=1,of=1))
case('imul_1op_32_overflow','one-operand 32-bit imul: edx:eax, both zero-extended',
 ['imul ebx'], set_='rax=0x10000 rbx=0x10000 rdx=0xffffffffffffffff', expects=ex(rax='0x0',rdx='0x1',cf=1,of=1))
case('imul_2op_32','two-operand 32-bit imul truncates: CF=OF=1',
 ['imul eax, ebx'], set_='rax=0x10000 rbx=0x10000', expects=ex(rax='0x0',cf=1,of=1,zf='unknown'))
case('imul_2op_16','two-operand 16-bit imul merges',
 ['imul ax, dx'], set_='rax=0xaaaa0100 rdx=0xff', expects=ex(rax='0xaaaaff00',cf=1,of=1))
case('imul_3op_64','three-operand imul with negative immediate',
 ['imul rdi, rsi, -3'], set_='rsi=7', expects=ex(rdi='0xffffffffffffffeb',cf=0,of=0))
case('imul_3op_32_imm32','three-operand 32-bit imul with imm32',
 ['imul ecx, edx, 0x10000'], set_='rdx=0x8000', expects=ex(rcx='0x80000000',cf=1,of=1))
# ---- mov family
case('mov_32_zero_extends','mov to a 32-bit register clears the upper half',
 ['mov eax, 5'], set_='rax=0xffffffffffffffff', expects=ex(rax='0x5'))
case('mov_16_merge','mov to ax merges',
 ['mov ax, 0x1234'], set_='rax=0xffffffffffffffff', expects=ex(rax='0xffffffffffff1234'))
case('mov_8_high_low','mov to ah and al, then ch from ah',
 ['mov ah, 0x12','mov al, 0x34','mov ch, ah'], set_='rax=0 rcx=0xaaaa', expects=ex(rax='0x1234',rcx='0x12aa'))
case('mov_8_rex','mov to sil/dil/r8b uses the low byte',
 ['mov sil, 0x80','mov r8b, sil','mov dil, r8b'], set_='rsi=0xffff rdi=0 r8=0x1111111111111111', expects=ex(rsi='0xff80',r8='0x1111111111111180',rdi='0x80'))
case('mov_64_imm','movabs 64-bit immediate',
 ['movabs r9, 0x123456789abcdef0','mov r10, r9'], expects=ex(r9='0x123456789abcdef0',r10='0x123456789abcdef0'))
case('mov_reg_unknown','copy of an unknown register stays unknown',
 ['mov rax, rbx'], set_='rax=1', expects=ex(rax='unknown'))
case('mov_imm_sign_extended','mov r64, imm32 sign-extends',
 ['mov rax, -1'], expects=ex(rax='0xffffffffffffffff'))
case('movzx_all','movzx from 8/16 bits, including ch',
 ['movzx eax, cl','movzx rdx, cx','movzx ebx, ch','movzx si, cl'], set_='rcx=0xffff80 rsi=0x1111111111111111', expects=ex(rax='0x80',rdx='0xff80',rbx='0xff',rsi='0x1111111111110080'))
case('movsx_all','movsx from 8/16 bits at every width',
 ['movsx rax, cl','movsx edx, cl','movsx si, cl','movsx rdi, bx'], set_='rcx=0x80 rsi=0x1111111111111111 rbx=0x8001', expects=ex(rax='0xffffffffffffff80',rdx='0xffffff80',rsi='0x111111111111ff80',rdi='0xffffffffffff8001'))
case('movsxd','movsxd sign-extends 32 to 64',
 ['movsxd rax, ecx','movsxd rdx, ebx'], set_='rcx=0xffffffff80000000 rbx=0x7fffffff', expects=ex(rax='0xffffffff80000000',rdx='0x7fffffff'))
case('lea_forms','lea with base+index*scale+disp, 32-bit lea wraps and zero-extends',
 ['lea rax, [rbx+rcx*8+0x10]','lea edx, [rbx-0x2000]','lea rsi, [rcx+rcx*2]'], set_='rbx=0x1000 rcx=3', flag='cf=1', expects=ex(rax='0x1028',rdx='0xfffff000',rsi='0x9',cf=1))
case('lea_unknown_index','lea with an unknown index stays residual; known base folds into the displacement',
 ['lea rax, [rbx+rcx*4]'], set_='rbx=0x1000', expects=ex(rax='unknown',rbx='0x1000')+['expect residual has: lea rax, [rcx*4+0x1000]'])
# ---- loads
MEM='0x200000 = 78 56 34 12 ef cd ab 89 00 80 ff 7f'
case('load_const','loads from constant memory fold at every width',
 ['mov eax, [rbx+4]','movzx ecx, byte ptr [rbx+1]','movsx rdx, word ptr [rbx+6]','mov rsi, [rbx]','mov di, [rbx+8]','mov r8b, [rbx+9]'],
 set_='rbx=0x200000 rdi=0xaaaaaaaaaaaaaaaa r8=0', mem=[MEM],
 expects=ex(rax='0x89abcdef',rcx='0x56',rdx='0xffffffffffff89ab',rsi='0x89abcdef12345678',rdi='0xaaaaaaaaaaaa8000',r8='0x80')+['expect residual lacks: movzx','expect residual lacks: movsx'])
case('load_const_alu','arithmetic with a constant memory operand folds',
 ['add rdi, [rbx]','cmp dword ptr [rbx+8], 0x7fff8000','sub r9d, [rbx+4]'], set_='rbx=0x200000 rdi=1 r9=0', mem=[MEM],
 expects=ex(rdi='0x89abcdef12345679',zf=0,cf=1,of=0,r9='0x76543211'))
case('load_absolute','absolute-address load from constant memory',
 ['mov eax, dword ptr [0x200004]'], mem=[MEM], expects=ex(rax='0x89abcdef'))
case('load_partly_outside','a load that runs past the constant bytes is not folded',
 ['mov rax, [rbx+8]'], set_='rbx=0x200000', mem=[MEM], expects=ex(rax='unknown')+['expect residual has: mov rax, [0x200008]'], extra=['native: no'])
case('load_unknown_base','a load through an unknown base stays residual',
 ['mov eax, [rbx+4]'], mem=[MEM], expects=ex(rax='unknown'), extra=['native: no'])
case('load_not_constant','a load from memory that is not constant stays residual',
 ['mov eax, [rbx]'], set_='rbx=0x300000', mem=[MEM], expects=ex(rax='unknown',rbx='0x300000'), extra=['native: no'])
case('store_residual','stores stay residual, registers around them fold',
 ['mov eax, 7','mov [rbx], eax','add eax, 1'], expects=ex(rax='0x8'), extra=['native: no'])
# ---- cmp / test
case('cmp_below','cmp 5, 7: CF, SF, AF',
 ['cmp eax, 7'], set_='rax=5', expects=ex(rax='0x5',cf=1,zf=0,sf=1,of=0,pf=0,af=1))
case('cmp_equal_8','8-bit cmp of equal values',
 ['cmp al, bh'], set_='rax=0x42 rbx=0x4200', expects=ex(zf=1,cf=0,sf=0,of=0,pf=1,af=0))
case('cmp_overflow16','16-bit cmp 0x8000 - 1 overflows',
 ['cmp cx, 1'], set_='rcx=0x8000', expects=ex(of=1,sf=0,cf=0,zf=0,af=1,pf=1))
case('cmp_64_reg','64-bit cmp of registers',
 ['cmp rdx, rsi'], set_='rdx=1 rsi=0xffffffffffffffff', expects=ex(cf=1,zf=0,sf=0,of=0,pf=0,af=1))
case('test_8','test al, al with bit 7 set',
 ['test al, al'], set_='rax=0x80', expects=ex(sf=1,zf=0,cf=0,of=0,pf=0,af='unknown'))
case('test_64_imm','test rax, imm',
 ['test rax, 0x100'], set_='rax=0xff', expects=ex(zf=1,sf=0,cf=0,of=0,pf=1))
case('test_16_regs','16-bit test of two registers',
 ['test cx, dx'], set_='rcx=0x8001 rdx=0x8000', expects=ex(zf=0,sf=1,pf=1,cf=0,of=0))
# ---- setcc / cmovcc / jcc
CONDS=['b','ae','e','ne','be','a','s','ns','o','no','p','np','l','ge','le','g']
def cond(c, f):
    cf,zf,sf,of,pf=f['cf'],f['zf'],f['sf'],f['of'],f['pf']
    return {'b':cf,'ae':1-cf,'e':zf,'ne':1-zf,'be':cf|zf,'a':1-(cf|zf),'s':sf,'ns':1-sf,'o':of,'no':1-of,'p':pf,'np':1-pf,'l':int(sf!=of),'ge':int(sf==of),'le':zf|int(sf!=of),'g':1-(zf|int(sf!=of))}[c]
B8=['al','cl','dl','bl','sil','dil','r8b','r9b']
R64=['rax','rcx','rdx','rbx','rsi','rdi','r8','r9']
for fi,fl in enumerate([dict(cf=1,zf=0,sf=1,of=0,pf=1),dict(cf=0,zf=1,sf=0,of=1,pf=0),dict(cf=0,zf=0,sf=1,of=1,pf=1)]):
    fs=' '.join(f'{k}={v}' for k,v in fl.items())
    for half in (0,1):
        cs=CONDS[half*8:half*8+8]
        asm=[f'set{c} {B8[i]}' for i,c in enumerate(cs)]
        exps=[f'{R64[i]}: {hex(0x1100+cond(c,fl))}' for i,c in enumerate(cs)]
        case(f'setcc_{fi}_{half}',f'setcc {"/".join(cs)} with {fs}',asm,set_=' '.join(f'{r}=0x11ff' for r in R64),flag=fs,expects=exps+['expect residual lacks: set'+c for c in cs])
    # cmovcc: dest r-regs preset to index, source rax=0x5555
    DST=['rcx','rdx','rbx','rsi','rdi','r8','r9','r10','r11','r12','r13','r14','r15','rbp','r8','r9']
    for half in (0,1):
        cs=CONDS[half*8:half*8+8]
        asm=[]; exps=[]; sets=['rax=0xaaaa000055555555']
        for i,c in enumerate(cs):
            d=DST[i]
            init=0x1000000000000000+i
            sets.append(f'{d}={hex(init)}')
            if i%2==0:
                asm.append(f'cmov{c} {d}, rax'); v=0xaaaa000055555555 if cond(c,fl) else init
            else:
                d32={'rdx':'edx','rsi':'esi','r8':'r8d','r10':'r10d','r12':'r12d','r14':'r14d','rbp':'ebp','r9':'r9d'}[d]
                asm.append(f'cmov{c} {d32}, eax'); v=0x55555555 if cond(c,fl) else init&0xffffffff
            exps.append(f'{d}: {hex(v)}')
        case(f'cmovcc_{fi}_{half}',f'cmovcc {"/".join(cs)} with {fs} (32-bit forms zero-extend even when not moving)',asm,set_=' '.join(sets),flag=fs,expects=exps+['expect residual lacks: cmov'+c for c in cs])
    # jcc: count not-taken with lea (no flags)
    asm=[]
    for i,c in enumerate(CONDS):
        asm += [f'j{c} L{i}', 'lea eax, [rax+1]', f'L{i}:']
    nt=sum(1-cond(c,fl) for c in CONDS)
    case(f'jcc_all_{fi}',f'every jcc folds with {fs}: rax counts the not-taken ones',asm,set_='rax=0',flag=fs,expects=ex(rax=hex(nt))+['expect residual lacks: j'+c for c in CONDS]+['expect exits: 1'])
case('jcc_from_cmp','cmp of known values decides the branch',
 ['cmp rcx, 5','jne L1','mov eax, 7','L1:','mov ebx, 2'], set_='rcx=5', expects=ex(rax='0x7',rbx='0x2',zf=1)+['expect residual lacks: jne'])
case('jcc_unknown_join','an unknown branch explores both paths; the exits join',
 ['test ecx, ecx','jz L1','mov eax, 7','mov edx, 1','jmp L2','L1:','mov edx, 1','L2:'], expects=ex(rdx='0x1',rax='unknown',zf='unknown'))
case('jcc_backward_loop','a counted loop with a known counter unrolls completely',
 ['mov ecx, 4','xor eax, eax','L1:','add eax, 3','dec ecx','jnz L1'], expects=ex(rax='0xc',rcx='0x0',zf=1)+['expect residual lacks: jnz','expect residual lacks: add'], extra=['native: yes'])
case('jmp_direct','direct jmp skips code',
 ['mov eax, 1','jmp L1','mov eax, 2','L1:','add eax, 1'], expects=ex(rax='0x2')+['expect residual lacks: add'])
# jump table in constant memory: code offsets fixed below (see comment in file)
case('jmp_table_abs','jmp through a constant absolute jump table with a known index becomes direct',
 ['jmp qword ptr [rcx*8+0x200000]','mov ebx, 10','jmp L9','mov ebx, 11','jmp L9','mov ebx, 12','jmp L9','L9:'],
 set_='rcx=2', mem=['0x200000 = 07 00 00 01 00 00 00 00  0e 00 00 01 00 00 00 00  15 00 00 01 00 00 00 00'],
 expects=ex(rbx='0xc',rcx='0x2')+['expect residual lacks: jmp qword ptr [rcx*8+0x200000]'], extra=['native: yes'])
case('jmp_table_rel','gcc-style relative jump table: lea rip, movsxd, add, jmp reg',
 ['lea rdx, [rip+0xf9]','movsxd rax, dword ptr [rdx+rcx*4]','add rax, rdx','jmp rax','mov ebx, 10','jmp L9','mov ebx, 11','jmp L9','mov ebx, 12','jmp L9','L9:'],
 set_='rcx=1', mem=['0x1000100 = 10 ff ff ff  17 ff ff ff  1e ff ff ff'],
 expects=ex(rbx='0xb',rax='0x1000017',rdx='0x1000100')+['expect residual lacks: jmp rax'], extra=['native: yes'])
case('jmp_reg_known_inside','jmp via a known register inside the snippet becomes direct',
 ['jmp rax','mov ebx, 1','mov ecx, 2'], set_='rax=0x1000007', expects=ex(rbx='unknown',rcx='0x2')+['expect residual lacks: jmp rax'], extra=['native: yes'])
case('jmp_reg_known_outside','jmp via a known register outside the snippet is an exit to that address',
 ['mov ebx, 3','jmp rax'], set_='rax=0x2000000', expects=['expect exit 0x2000000: rbx=3','expect no-fallthrough','expect exits: 1'])
case('jmp_reg_unknown','jmp via an unknown register cannot fall through',
 ['mov ebx, 3','jmp rax'], expects=['expect no-fallthrough'])
case('call_ret_residual','call stays residual; after it nothing is known',
 ['call L1','mov ebx, 2','jmp L2','L1:','mov eax, 1','ret','L2:'], set_='rcx=5', expects=ex(rbx='0x2',rax='unknown',rcx='unknown')+['expect residual has: call 0x100000c'], extra=['native: yes','ignore: stack'])
case('ret_residual','ret with an unknown return address stays residual',
 ['mov eax, 5','ret'], expects=['expect residual has: ret','expect no-fallthrough'])
case('push_pop','push/pop stay residual; rsp is tracked',
 ['push rax','push 7','pop rbx','pop rcx','mov edx, 1'], set_='rsp=0x7ff000 rax=5', expects=ex(rsp='0x7ff000',rdx='0x1')+['expect residual has: pop rbx'])
case('push_pop_16','16-bit push/pop move rsp by 2',
 ['push ax','pop cx'], set_='rsp=0x7ff000', expects=ex(rsp='0x7ff000'))
case('nops','nop forms fold away and keep state',
 ['nop','nop dword ptr [rax+rax*1+0x0]','endbr64','xchg ax, ax','nop word ptr [rax+rax*1+0x0]'], set_='rax=1', flag='cf=1', expects=ex(rax='0x1',cf=1)+['expect residual lacks: nop','expect residual lacks: endbr64'])
case('shl_count0_32','32-bit shl by a masked-zero count still writes (zero-extends) the 32-bit register, flags kept',
 ['shl eax, cl'], set_='rax=0xffffffff00000005 rcx=0x20', flag='cf=1 zf=1', expects=ex(rax='0x5',cf=1,zf=1))
case('rol_count0_32','32-bit rol by a masked-zero count zero-extends, flags kept',
 ['rol edx, cl'], set_='rdx=0xffffffff80000001 rcx=0x40', flag='cf=0 of=1', expects=ex(rdx='0x80000001',cf=0,of=1))
case('mem_known_index_to_disp','a known index register folds into the displacement (disp8 and disp32 forms encode)',
 ['movzx eax, byte ptr [rsi+rdx*1]','mov ecx, dword ptr [rdi+rbx*4+0x10]'], set_='rdx=0x80 rbx=0x1000', expects=ex(rax='unknown',rdx='0x80')+['expect residual has: movzx eax, byte ptr [rsi+0x80]','expect residual has: mov ecx, dword ptr [rdi+0x4010]'], extra=['native: no'])
case('mem_known_index_small_disp','a known index folds into a small displacement',
 ['mov rax, qword ptr [rsi+rcx*8]'], set_='rcx=5', expects=['expect residual has: mov rax, qword ptr [rsi+0x28]'], extra=['native: no'])
case('store_64_scratch','a 64-bit register store stays residual and writes nothing else',
 ['mov qword ptr [rbx+0xca], r9','mov dword ptr [rbx+0x10], 0x1234','add qword ptr [rbx+0x20], rcx'], set_='rbx=0x400000', expects=ex(rbx='0x400000'), extra=['scratch: 0x400000 0x100'])
case('store_known_value','stores of known registers: the value may become an immediate, memory gets the right bytes',
 ['mov eax, 0x11223344','mov dword ptr [rbx], eax','mov word ptr [rbx+4], ax','mov byte ptr [rbx+6], ah','mov qword ptr [rbx+8], rax'], set_='rbx=0x400000', expects=ex(rax='0x11223344'), extra=['scratch: 0x400000 0x100'])
case('store_known_address','a store through a known base with an unknown value',
 ['mov qword ptr [rcx+rdx*8], rsi','mov r8, qword ptr [rcx+8]'], set_='rcx=0x400000 rdx=1', expects=ex(r8='unknown'), extra=['scratch: 0x400000 0x100'])
case('store_unknown_base','a store through an unknown base register writes only memory',
 ['mov qword ptr [rbx+0xca], r9','mov dword ptr [rbx+0x10], esi'], expects=ex(rbx='unknown'), extra=['scratch: 0x400000 0x100','input: rbx=0x400000'])
case('chain_fallthrough','a chained exit jumps to the chain target instead of the original address',
 ['mov eax, 5','add eax, ecx'], set_='rcx=1', expects=ex(rax='0x6')+['expect exit 0x1000007: reason=left_region rax=0x6','expect residual has: jmp 0x3000000'], extra=['chain: 0x1000007 = 0x3000000','native: no'])
case('budget_exit','a tiny code budget turns pending work into budget exits to the original',
 ['L1:','add eax, ecx','dec edx','jnz L1'], expects=['expect exit any: reason=budget'], extra=['budget: 1','native: no'])
case('widening_unknown_loop','a loop whose counter is unknown stays a loop; known-but-changing values are widened',
 ['xor eax, eax','L1:','add eax, 3','dec ecx','jnz L1','mov ebx, 1'], expects=ex(rax='unknown',rbx='0x1')+['expect residual has: add eax, 3'], extra=['max-states: 2','native: no'])
case('unknown_target_exit','an indirect jump through an unknown register is an unknown-target exit',
 ['mov ebx, 3','jmp rax'], expects=['expect no-fallthrough'])
