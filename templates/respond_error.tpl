% rebase('base.tpl', title='Cannot respond')
<p class="outcome" id="outcome">{{message}}</p>
